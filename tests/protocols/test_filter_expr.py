"""Consul's ?filter= language: operators, selectors, errors, and hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from konsul.protocols.http.filter_expr import MAX_DEPTH, MAX_LENGTH, FilterError, parse
from konsul.protocols.http.filter_fields import CATALOG_SERVICE, HEALTH_SERVICE

WEB = {
    "Node": {"Node": "n1", "Address": "10.0.0.1", "Meta": {"rack": "r1"}, "TaggedAddresses": {}},
    "Service": {
        "ID": "web-1", "Service": "web", "Tags": ["v1", "blue"], "Meta": {"env": "prod", "team": "edge"},
        "Port": 8080, "Address": "", "EnableTagOverride": False, "Kind": "",
        "TaggedAddresses": {"lan": {"Address": "10.0.0.5", "Port": 80}}, "Weights": {"Passing": 1, "Warning": 1},
    },
    "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:web-1", "Status": "critical"}],
}


def matches(expression: str, document=WEB) -> bool:
    return parse(expression, HEALTH_SERVICE)(document)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('Service.Tags contains "v1" and Service.Meta.env == "prod"', True),
        ('Service.Tags contains "v2"', False),
        ('Service.Tags not contains "v2"', True),
        ('"blue" in Service.Tags', True),
        ('"green" not in Service.Tags', True),
        ("Service.Meta.env == prod", True),  # unquoted values
        ("Service.Meta.env != `prod`", False),  # raw strings
        ('Service.Meta["team"] == "edge"', True),
        ('"env" in Service.Meta', True),
        ("Service.Meta.missing is empty", True),
        ("Service.Meta.missing != x", True),
        ("Service.Address is empty and Service.Tags is not empty", True),
        ("Service.Port == 8080", True),
        ('Service.Port == "8080"', True),
        ("Service.Port != 80", True),
        ("Service.EnableTagOverride == false", True),
        ('Service.ID matches "^web-[0-9]+$"', True),
        ('Service.ID not matches "^db"', True),
        ('Service.Tags matches "^bl"', True),
        ("Service.TaggedAddresses.lan.Port == 80", True),
        ('Node.Meta.rack == "r1" or Service.Port == 1', True),
        ('not (Service.Port == 8080) or Service.ID == "x"', False),
        ('not Service.Port == 8080', False),
        ('((Service.Port == 8080))', True),
        ('Checks.Status == "critical"', True),  # through a list: any element
        ('Checks.Status != "passing"', False),  # negated through a list: every element
        ('Service.Service == web and Service.Port == 1 or Service.ID == "web-1"', True),  # and binds tighter
        ('"-" in Service.ID', True),  # substring of a string
    ],
)
def test_operators(expression, expected):
    assert matches(expression) is expected


@pytest.mark.parametrize(
    ("expression", "detail"),
    [
        ("Service.Nope == 1", "unknown selector 'Service.Nope'"),
        ("Nope", "unknown selector"),
        ("Service.Port == abc", "is an integer"),
        ("Service.EnableTagOverride == maybe", "true or false"),
        ("Service.Tags == v1", "compare it with contains"),
        ("Service.Port contains 1", "'in' and 'contains' need"),
        ('Service.Port matches "1"', "'matches' needs a string"),
        ('Service.ID matches "(unclosed"', "not a regular expression"),
        ("Service.Port is empty", "never empty"),
        ("Service.ID ==", "expected a value"),
        ('Service.ID == "x" and', "expected a selector"),
        ('(Service.ID == "x"', "expected ')'"),
        ('Service.ID == "x")', "expected 'and', 'or'"),
        ('Service.ID = "x"', "unexpected '='"),
        ('Service.ID == "x\\q"', "unknown escape"),
        ("Service.ID == and", "quote it if it is a keyword"),
        ("   ", "empty"),
        ("Service..ID == x", "empty part"),
    ],
)
def test_errors_say_what_is_wrong(expression, detail):
    with pytest.raises(FilterError) as raised:
        parse(expression, HEALTH_SERVICE)
    assert detail in str(raised.value)
    assert raised.value.status == 400


def test_unknown_selector_lists_what_there_is():
    with pytest.raises(FilterError) as raised:
        parse("Port == 1", CATALOG_SERVICE)
    assert "ServicePort" in str(raised.value)


def test_nesting_and_size_are_bounded():
    deep = "(" * (MAX_DEPTH + 1) + "ServicePort == 1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(FilterError, match="nested"):
        parse(deep, CATALOG_SERVICE)
    with pytest.raises(FilterError, match="nested"):
        parse("not " * (MAX_DEPTH + 1) + "ServicePort == 1", CATALOG_SERVICE)
    shallow = "(" * (MAX_DEPTH - 1) + "ServicePort == 1" + ")" * (MAX_DEPTH - 1)
    assert parse(shallow, CATALOG_SERVICE)({"ServicePort": 1})
    with pytest.raises(FilterError, match="at most"):
        parse("ServicePort == 1 or " * 1000 + "ServicePort == 1", CATALOG_SERVICE)
    # Long flat chains within the size limit evaluate without recursion trouble.
    chain = " or ".join(["ServicePort == 2"] * 200) + " or ServicePort == 1"
    assert len(chain) < MAX_LENGTH and parse(chain, CATALOG_SERVICE)({"ServicePort": 1})


def test_a_pathological_pattern_runs_in_linear_time():
    found = parse('ServiceName matches "(a+)+$"', CATALOG_SERVICE)
    assert not found({"ServiceName": "a" * 5000 + "b"})  # backtracking engines take forever here


_ALPHABET = st.sampled_from(
    ["(", ")", " ", '"', "`", "\\", "[", "]", ".", "==", "!=", "and", "or", "not", "in", "contains", "matches",
     "is", "empty", "ServiceTags", "ServiceMeta", "ServicePort", "x", "1", "\u00e9", "\x00", "*"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=60).map(" ".join) | st.text(max_size=300))
def test_hostile_input_is_a_filter_error_or_a_filter(text):
    try:
        found = parse(text, CATALOG_SERVICE)
    except FilterError as error:
        assert str(error)
        return
    # Whatever parsed evaluates on any document without raising.
    found({"ServiceTags": ["x"], "ServiceMeta": {"x": "1"}, "ServicePort": 1})
    found({})

"""Policy rules: parsing (HCL and JSON), precedence, globs, deny, list filtering."""

from __future__ import annotations

import json
import time

import pytest

from konsul.sync.acl_rules import MANAGEMENT, Authorizer, PermissionDenied, parse_rules, shorthand_rules
from konsul.sync.errors import InvalidArgument

CONSUL_EXAMPLE = """
# These control access to the key/value store.
key_prefix "" {
  policy = "read"
}
key_prefix "foo/" {
  policy = "write"
}
key_prefix "foo/private/" {
  policy = "deny"
}
# Or for exact key matches
key "foo/bar/secret" {
  policy = "deny"
}
operator = "read"
"""


def authorizer(*texts: str) -> Authorizer:
    return Authorizer([parse_rules(text) for text in texts], principal="test-accessor")


# -- parsing -------------------------------------------------------------------------


def test_hcl_and_its_json_form_give_the_same_rules():
    as_json = json.dumps(
        {
            "key_prefix": {"": {"policy": "read"}, "foo/": {"policy": "write"}, "foo/private/": {"policy": "deny"}},
            "key": {"foo/bar/secret": {"policy": "deny"}},
            "operator": "read",
        }
    )
    hcl, js = parse_rules(CONSUL_EXAMPLE), parse_rules(as_json)
    assert sorted(hcl.rules, key=repr) == sorted(js.rules, key=repr)
    assert hcl.scalars == js.scalars == {"operator": 1}


def test_every_resource_parses():
    text = "\n".join(
        f'{resource}{suffix} "x" {{ policy = "write" }}'
        for resource in ("key", "service", "node", "agent", "session", "event", "device")
        for suffix in ("", "_prefix")
    ) + '\noperator = "write"\nacl = "read"\nkeyring = "deny"\n'
    parsed = parse_rules(text)
    assert len(parsed.rules) == 14
    assert parsed.scalars == {"operator": 3, "acl": 1, "keyring": 4}


def test_rules_given_as_a_json_string_are_read_as_rules():
    # py-consul's policy.create(rules="...") sends json.dumps of the text.
    parsed = parse_rules(json.dumps('key_prefix "app/" { policy = "write" }'))
    assert authorizer(json.dumps('key_prefix "app/" { policy = "write" }')).allows("key", "app/x", "write")
    assert len(parsed.rules) == 1


def test_empty_rules_grant_nothing():
    assert not authorizer("").allows("key", "x", "read")


@pytest.mark.parametrize(
    "text, says",
    [
        ('key_prefix "a/" { policy = "raed" }', "line 1"),
        ('\n\nkey_prefix "a/" { policy = "raed" }', "line 3"),
        ('key_prefix "a/" { policy = "raed" }', "'raed' is not one of read, write, list, deny"),
        ('key_prefx "a/" { policy = "read" }', "unknown ACL resource 'key_prefx'"),
        ('key "a" { polcy = "read" }', "unknown field 'polcy'"),
        ('key "a" { }', "has no policy"),
        ('key "a" { policy = "read"', "not valid HCL"),
        ('{"key": {"a": {"policy": "read"}', "not valid JSON"),
        ('operator = "list"', '"list" applies to key and device rules only'),
        ('service "web" { policy = "list" }', '"list" applies to key and device rules only'),
        ('key "a" { policy = "deny" }\nkey "a" { policy = "write" }', 'key "a" twice'),
        ('operator = "read"\noperator = "write"', "operator twice"),
        ('key "a/**b" { policy = "read" }', "whole path segments"),
        ('key "*a*" { policy = "read" }', "at most one '*'"),
        ('key "**/a/**" { policy = "read" }', "at most one '**'"),
        ('{"key": 3}', "takes a name and a block"),
        ("[1, 2]", "not valid HCL"),
        ('key "' + "x" * 600 + '" { policy = "read" }', "at most 512 characters"),
        ("#" * (65 * 1024), "at most 65536 bytes"),
    ],
)
def test_malformed_rules_are_refused_with_what_is_wrong(text, says):
    with pytest.raises(InvalidArgument) as refused:
        parse_rules(text)
    assert says in str(refused.value)


def test_deeply_nested_rules_are_refused_not_crashing():
    with pytest.raises(InvalidArgument):
        parse_rules("{" * 5000 + "}" * 5000)
    with pytest.raises(InvalidArgument):
        parse_rules('key "a" ' + "{ x = " * 3000 + "1" + " }" * 3000)


# -- precedence ------------------------------------------------------------------------


def test_consuls_example_precedence():
    a = authorizer(CONSUL_EXAMPLE)
    assert a.allows("key", "anything", "read") and not a.allows("key", "anything", "write")
    assert a.allows("key", "foo/x", "write")
    assert not a.allows("key", "foo/private/x", "read")  # the longer prefix wins
    assert not a.allows("key", "foo/bar/secret", "read")  # the exact rule wins
    assert a.allows("key", "foo/bar/secret2", "write")  # an exact rule is not a prefix
    assert a.allows("operator", "", "read") and not a.allows("operator", "", "write")
    assert not a.allows("acl", "", "read")


def test_exact_beats_any_prefix_even_a_longer_one():
    a = authorizer('key "app" { policy = "read" }\nkey_prefix "app" { policy = "write" }')
    assert not a.allows("key", "app", "write")
    assert a.allows("key", "apple", "write")


def test_deny_wins_over_write_at_the_same_specificity_across_policies():
    a = authorizer('key_prefix "app/" { policy = "write" }', 'key_prefix "app/" { policy = "deny" }')
    assert not a.allows("key", "app/x", "read")
    b = authorizer('key_prefix "app/" { policy = "read" }', 'key_prefix "app/" { policy = "write" }')
    assert b.allows("key", "app/x", "write")  # write over read, as Consul merges policies


def test_a_more_specific_allow_beats_a_broader_deny():
    a = authorizer('key_prefix "" { policy = "deny" }\nkey_prefix "pub/" { policy = "read" }')
    assert a.allows("key", "pub/x", "read") and not a.allows("key", "other", "read")


def test_access_levels_imply_as_consul():
    a = authorizer('key_prefix "w/" { policy = "write" }\nkey_prefix "l/" { policy = "list" }\nkey_prefix "r/" { policy = "read" }')
    assert [a.allows("key", "w/x", x) for x in ("read", "list", "write")] == [True, True, True]
    assert [a.allows("key", "l/x", x) for x in ("read", "list", "write")] == [True, True, False]
    assert [a.allows("key", "r/x", x) for x in ("read", "list", "write")] == [True, False, False]


def test_default_deny_and_other_resources_unaffected():
    a = authorizer('service_prefix "web" { policy = "write" }')
    assert a.allows("service", "web-1", "write")
    assert not a.allows("service", "db", "read")
    assert not a.allows("key", "web", "read")
    assert not a.allows("node", "web", "read")
    assert not a.allows("operator", "", "read")


def test_device_rules():
    a = authorizer('device_prefix "sensor-" { policy = "write" }\ndevice "sensor-7" { policy = "read" }')
    assert a.allows("device", "sensor-1", "write")
    assert a.allows("device", "sensor-7", "read") and not a.allows("device", "sensor-7", "write")
    assert not a.allows("device", "pump-1", "read")


def test_management_allows_everything():
    assert MANAGEMENT.allows("key", "x", "write")
    assert MANAGEMENT.allows("acl", "", "write")
    assert MANAGEMENT.allows_subtree("key", "", "write")
    assert MANAGEMENT.filter("key", ["a", "b"]) == ["a", "b"]


# -- globs -------------------------------------------------------------------------------


def test_single_star_matches_within_one_segment():
    a = authorizer('key "sites/*/config" { policy = "write" }')
    assert a.allows("key", "sites/berlin/config", "write")
    assert not a.allows("key", "sites/berlin/x/config", "write")
    assert not a.allows("key", "sites/berlin/config/more", "write")  # an exact glob matches whole names
    b = authorizer('key "dev-*/cfg" { policy = "read" }')
    assert b.allows("key", "dev-42/cfg", "read") and not b.allows("key", "prod-42/cfg", "read")


def test_double_star_matches_any_depth():
    a = authorizer('key_prefix "fleet/**/firmware/" { policy = "write" }')
    for key in ("fleet/firmware/v1", "fleet/a/firmware/v1", "fleet/a/b/c/firmware/v1"):
        assert a.allows("key", key, "write"), key
    assert not a.allows("key", "fleet/a/firmwarex/v1", "write")
    assert not a.allows("key", "other/firmware/v1", "write")
    b = authorizer('key "logs/**" { policy = "read" }')
    assert b.allows("key", "logs/a", "read") and b.allows("key", "logs/a/b", "read")
    assert not b.allows("key", "log/a", "read")


def test_glob_prefix_rules_rank_by_their_literal_length():
    a = authorizer(
        'key_prefix "sites/" { policy = "read" }\n'
        'key_prefix "sites/*/app/" { policy = "write" }\n'  # 11 literal characters: beats "sites/"
        'key_prefix "sites/berlin/app/secret" { policy = "deny" }'
    )
    assert a.allows("key", "sites/x/app/cfg", "write")
    assert a.allows("key", "sites/x/other", "read") and not a.allows("key", "sites/x/other", "write")
    assert not a.allows("key", "sites/berlin/app/secret", "read")


def test_an_exact_literal_rule_beats_an_exact_glob_and_globs_beat_prefixes():
    a = authorizer(
        'key "cfg/*" { policy = "write" }\n'
        'key "cfg/locked" { policy = "read" }\n'
        'key_prefix "cfg/" { policy = "deny" }'
    )
    assert a.allows("key", "cfg/x", "write")
    assert a.allows("key", "cfg/locked", "read") and not a.allows("key", "cfg/locked", "write")
    assert not a.allows("key", "cfg/x/y", "read")  # no exact glob matches: the prefix denies


def test_deny_wins_between_a_glob_and_a_literal_prefix_of_equal_weight():
    a = authorizer('key_prefix "ab/" { policy = "write" }\nkey_prefix "a*/" { policy = "deny" }')
    assert a.allows("key", "ax/k", "read") is False
    # "a*/" has 2 literal characters, "ab/" 3: the literal one is more specific.
    assert a.allows("key", "ab/k", "write")
    b = authorizer('key_prefix "ab" { policy = "write" }\nkey_prefix "a*/" { policy = "deny" }')
    assert not b.allows("key", "ab/k", "read")  # both weigh 2: deny wins


def test_glob_checks_stay_linear_on_hostile_names():
    # With free '*'s this name takes seconds against such a pattern (regex
    # backtracking); one '*' per segment and one '**' keep it linear.
    a = authorizer('key "**/*a/*a/*a/*b" { policy = "read" }')
    assert not a.allows("key", "a/" * 255, "read")
    assert a.allows("key", "x/ya/za/a/b", "read")


# -- lists and subtrees --------------------------------------------------------------------


def test_filter_keeps_what_the_token_may_see():
    a = authorizer(CONSUL_EXAMPLE + '\nkey_prefix "hidden/" { policy = "deny" }')
    names = ["a", "foo/x", "foo/private/y", "foo/bar/secret", "hidden/z"]
    assert a.filter("key", names) == ["a", "foo/x"]
    assert a.filter("key", names, "write") == ["foo/x"]
    assert a.filter("service", names) == []


def test_subtree_write_needs_every_rule_below_to_allow_it():
    a = authorizer(CONSUL_EXAMPLE)
    assert not a.allows_subtree("key", "", "write")  # "" is read-only
    assert not a.allows_subtree("key", "foo/", "write")  # foo/private/ and foo/bar/secret deny
    assert a.allows_subtree("key", "foo/pub/", "write")
    b = authorizer('key_prefix "" { policy = "write" }\nkey "x/*/secret" { policy = "deny" }')
    assert not b.allows_subtree("key", "", "write")
    assert not b.allows_subtree("key", "x/a/", "write")  # the glob may match below
    assert b.allows_subtree("key", "y/", "write")


def test_require_names_the_missing_permission():
    a = authorizer('key_prefix "app/" { policy = "read" }')
    a.require("key", "app/x", "read")
    with pytest.raises(PermissionDenied) as refused:
        a.require("key", "app/x", "write")
    assert refused.value.status == 403 and refused.value.code == "permission_denied"
    assert "test-accessor" in str(refused.value) and "'key:write'" in str(refused.value) and "'app/x'" in str(refused.value)
    with pytest.raises(PermissionDenied, match="'operator:read'"):
        a.require("operator", "", "read")


def test_answers_stay_right_past_the_memo_limit():
    a = authorizer('key_prefix "a/" { policy = "write" }')
    for i in range(20_000):
        assert a.allows("key", f"a/{i}", "write")
        assert not a.allows("key", f"b/{i}", "read")


def test_a_check_with_twenty_policies_costs_microseconds():
    policies = [
        f'key_prefix "team{i}/" {{ policy = "write" }}\nkey "team{i}/locked" {{ policy = "deny" }}\n'
        f'service_prefix "svc{i}" {{ policy = "read" }}\nkey_prefix "sites/*/team{i}/" {{ policy = "read" }}'
        for i in range(20)
    ]
    a = authorizer(*policies)
    names = [f"team{i % 25}/k{i}" for i in range(1000)]
    started = time.perf_counter()
    for name in names:
        a.allows("key", name, "write")
    cold = (time.perf_counter() - started) / len(names)
    started = time.perf_counter()
    for _ in range(10):
        for name in names:
            a.allows("key", name, "write")
    warm = (time.perf_counter() - started) / (10 * len(names))
    print(f"allows() with 20 policies: {cold * 1e6:.2f} us uncached, {warm * 1e6:.2f} us cached")
    assert warm < cold * 2  # no timing bound: the figure goes to the report


def test_device_shorthands_are_rules():
    a = Authorizer([shorthand_rules(["", "cfg/"], ["cfg/s1/"], ["sensor-1"])])
    assert a.allows("key", "anything", "read") and not a.allows("key", "cfg/x", "write")
    assert a.allows("key", "cfg/s1/x", "write")
    assert a.allows("device", "sensor-1", "write") and not a.allows("device", "sensor-2", "read")
    # The shorthands merge with the device's policies like any rules.
    b = Authorizer([shorthand_rules(["cfg/"]), parse_rules('key "cfg/secret" { policy = "deny" }')])
    assert b.allows("key", "cfg/x", "read") and not b.allows("key", "cfg/secret", "read")

"""The HTTP routing table and request arguments (protocols/http/router.py, request.py)."""

from __future__ import annotations

import pytest

from konsul.protocols.http.request import Headers, QueryArgs
from konsul.protocols.http.router import RouteTable, Routes, allow_header



def table() -> RouteTable:
    kv, acl, agent, hub = Routes("kv"), Routes("acl"), Routes("agent"), Routes("hub")
    kv.route("/v1/kv/<path:key>", methods=["GET", "PUT", "DELETE"])(_named("kv"))
    acl.route("/v1/acl/token/<accessor>", methods=["GET", "PUT", "DELETE"])(_named("token"))
    acl.route("/v1/acl/token/self", methods=["GET"])(_named("token_self"))
    agent.route("/v1/agent/check/<verb>/<check_id>", methods=["PUT"])(_named("report_check"))
    agent.route("/v1/agent/check/update/<check_id>", methods=["PUT"])(_named("update_check"))
    agent.route("/v1/agent/service/<service_id>", methods=["GET"])(_named("service_definition"))
    agent.route("/v1/agent/service/register", methods=["PUT"])(_named("register"))
    agent.route("/v1/devices/<device_id>/<any(desired, reported):side>", methods=["GET"])(_named("twin_side"))
    hub.websocket("/v1/sync")(_named("sync_socket"))
    return RouteTable([kv, acl, agent, hub])


def _named(name: str):
    async def handler(**kwargs):
        return kwargs

    handler.__name__ = name
    return handler


@pytest.mark.parametrize(
    ("path", "key"),
    [("/v1/kv/a/b", "a/b"), ("/v1/kv/", ""), ("/v1/kv//leading", "/leading"), ("/v1/kv/a//b/", "a//b/")],
)
def test_a_kv_key_is_the_rest_of_the_path_as_it_is(path, key):
    found = table().match("GET", path)
    assert found.route.endpoint == "kv.kv" and found.args == {"key": key}


def test_static_routes_win_over_patterns_that_also_match():
    routes = table()
    assert routes.match("GET", "/v1/acl/token/self").route.endpoint == "acl.token_self"
    assert routes.match("PUT", "/v1/acl/token/self").route.endpoint == "acl.token"
    assert routes.match("PUT", "/v1/agent/check/update/c1").route.endpoint == "agent.update_check"
    found = routes.match("PUT", "/v1/agent/check/pass/c1")
    assert found.route.endpoint == "agent.report_check" and found.args == {"verb": "pass", "check_id": "c1"}
    # A static route for another method does not hide a pattern that takes this one.
    assert routes.match("GET", "/v1/agent/service/register").route.endpoint == "agent.service_definition"


def test_a_wrong_method_is_a_405_with_what_is_allowed():
    found = table().match("POST", "/v1/kv/a")
    assert found.route is None and found.allowed == {"GET", "PUT", "DELETE"}
    assert allow_header(found.allowed) == "DELETE, GET, HEAD, OPTIONS, PUT"
    assert table().match("PUT", "/v1/agent/service/web").allowed == {"GET"}


def test_unknown_paths_and_segments_match_nothing():
    routes = table()
    for path in ("/v1/kv", "/v1/kvx", "/v1/acl/token/", "/v1/acl/token/a/b", "/v1/devices/d1/twin", "/v1/sync/"):
        found = routes.match("GET", path)
        assert found.route is None and not found.allowed, path


def test_any_takes_only_its_words_and_head_is_served_by_get():
    routes = table()
    assert routes.match("HEAD", "/v1/devices/d1/reported").args == {"device_id": "d1", "side": "reported"}
    assert routes.match("GET", "/v1/devices/d1/desiredx").route is None


def test_websocket_routes_are_apart_from_http_ones():
    routes = table()
    assert routes.match("WEBSOCKET", "/v1/sync").route.endpoint == "hub.sync_socket"
    assert routes.match("GET", "/v1/sync").allowed == {"WEBSOCKET"}
    assert routes.match("WEBSOCKET", "/v1/kv/a").route is None


def test_query_arguments_as_consul_reads_them():
    args = QueryArgs("recurse&tag=a&tag=b&dc=&sep=%2F&name=a+b&x=%E2%9C%93")
    assert "recurse" in args and args.get("recurse") == ""
    assert args.get("tag") == "a" and args.getlist("tag") == ["a", "b"]
    assert args.get("dc") == "" and args.get("missing") is None and args.get("missing", "d") == "d"
    assert args["sep"] == "/" and args["name"] == "a b" and args["x"] == "\u2713"
    assert args.getlist("missing") == []


def test_headers_ignore_case_and_join_repeats():
    headers = Headers([(b"X-Consul-Token", b"s"), (b"accept", b"a"), (b"Accept", b"b")])
    assert headers.get("x-consul-token") == "s" and "X-CONSUL-TOKEN" in headers
    assert headers["ACCEPT"] == "a, b" and headers.get("nope") is None

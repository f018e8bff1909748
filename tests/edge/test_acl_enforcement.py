"""ACLs enforced on every HTTP route of a real edge and hub: refusals, policies, globs, lists,
rate limits and the audit log."""

from __future__ import annotations

import json

import httpx
import pytest

from agents import MANAGEMENT_TOKEN, EdgeProcess, HubProcess, eventually, join_token

from konsul.hub.fleet_routes import fleet_api
from konsul.hub.sync_endpoint import sync_api
from konsul.protocols.http import app as http_app
from konsul.protocols.http.authz import CHECKED_IN_ROUTE, OPEN, ROUTE_ACCESS
from konsul.protocols.http.router import RouteTable

ADMIN = {"X-Consul-Token": MANAGEMENT_TOKEN}

# One request per route (endpoint -> method, path, body); the body of a write
# would succeed with a management token, so a refusal is the ACL's alone.
ROUTES = {
    "kv.kv": [("GET", "/v1/kv/app/a", None), ("GET", "/v1/kv/?recurse", None), ("GET", "/v1/kv/?keys", None),
              ("PUT", "/v1/kv/app/a", b"x"), ("PUT", "/v1/kv/app/a?flags=3", b"x"), ("DELETE", "/v1/kv/app/a", None),
              ("DELETE", "/v1/kv/?recurse", None), ("GET", "/v1/kv/app/a?history", None),
              ("PUT", "/v1/kv/app/a?acquire=0c3c5a0e-0000-4000-8000-000000000000", b"x")],
    "txn.transaction": [("PUT", "/v1/txn", json.dumps([{"KV": {"Verb": "get", "Key": "app/a"}}]).encode())],
    "agent.register": [("PUT", "/v1/agent/service/register", json.dumps({"Name": "web", "Port": 80}).encode())],
    "agent.deregister": [("PUT", "/v1/agent/service/deregister/web", None)],
    "agent.services": [("GET", "/v1/agent/services", None)],
    "agent.checks": [("GET", "/v1/agent/checks", None)],
    "agent.report_check": [("PUT", "/v1/agent/check/pass/service:web", None)],
    "agent.self_info": [("GET", "/v1/agent/self", None)],
    "catalog.catalog_services": [("GET", "/v1/catalog/services", None)],
    "catalog.catalog_service": [("GET", "/v1/catalog/service/web", None)],
    "catalog.catalog_nodes": [("GET", "/v1/catalog/nodes", None)],
    "catalog.health_service": [("GET", "/v1/health/service/web", None)],
    "catalog.health_checks": [("GET", "/v1/health/checks/web", None)],
    "catalog.health_state": [("GET", "/v1/health/state/any", None)],
    "devices.list_devices": [("GET", "/v1/devices", None)],
    "devices.device": [("GET", "/v1/devices/d1", None), ("PUT", "/v1/devices/d2", b"{}"),
                      ("PUT", "/v1/devices/d1?rotate-token", b"{}"), ("DELETE", "/v1/devices/d1", None)],
    "twin.twin_side": [("GET", "/v1/devices/d1/desired", None), ("PUT", "/v1/devices/d1/desired", b'{"a": 1}')],
    "twin.twin": [("GET", "/v1/devices/d1/twin", None)],
    "telemetry.device_telemetry": [("GET", "/v1/devices/d1/telemetry", None),
                                   ("POST", "/v1/devices/d1/telemetry", b'[{"t": 1}]')],
    "telemetry.fleet_telemetry": [("GET", "/v1/telemetry?type=sensor", None)],
    "ops.metrics": [("GET", "/metrics", None)],
    "ops.sync_status": [("GET", "/v1/sync/status", None)],
    "acl.create_token": [("PUT", "/v1/acl/token", b"{}")],
    "acl.token_self": [("GET", "/v1/acl/token/self", None)],
    "acl.token": [("GET", f"/v1/acl/token/{MANAGEMENT_TOKEN}", None)],
    "acl.list_tokens": [("GET", "/v1/acl/tokens", None)],
    "acl.create_policy": [("PUT", "/v1/acl/policy", b'{"Name": "p"}')],
    "acl.policy": [("GET", "/v1/acl/policy/00000000-0000-0000-0000-000000000001", None)],
    "acl.policy_by_name": [("GET", "/v1/acl/policy/name/global-management", None)],
    "acl.list_policies": [("GET", "/v1/acl/policies", None)],
    # checks, maintenance, members and the node-level catalog
    "agent.register_check": [("PUT", "/v1/agent/check/register", json.dumps({"Name": "disk", "TTL": "30s"}).encode()),
                             ("PUT", "/v1/agent/check/register",
                              json.dumps({"Name": "w", "ServiceID": "web", "TTL": "30s"}).encode())],
    "agent.deregister_check": [("PUT", "/v1/agent/check/deregister/service:web", None)],
    "agent.update_check": [("PUT", "/v1/agent/check/update/service:web", b'{"Status": "passing"}')],
    "agent.service_maintenance": [("PUT", "/v1/agent/service/maintenance/web?enable=true", None)],
    "agent.node_maintenance": [("PUT", "/v1/agent/maintenance?enable=true", None)],
    "agent.members": [("GET", "/v1/agent/members", None)],
    "agent.service_definition": [("GET", "/v1/agent/service/web", None)],
    "catalog.catalog_register": [("PUT", "/v1/catalog/register",
                                  json.dumps({"Node": "plc-1", "Address": "10.0.0.9",
                                              "Service": {"Service": "modbus", "Port": 502}}).encode())],
    "catalog.catalog_deregister": [("PUT", "/v1/catalog/deregister", b'{"Node": "n1", "ServiceID": "web"}')],
    "catalog.catalog_node": [("GET", "/v1/catalog/node/n1", None)],
    "catalog.catalog_node_services": [("GET", "/v1/catalog/node-services/n1", None)],
    "catalog.health_node": [("GET", "/v1/health/node/n1", None)],
    "catalog.health_connect": [("GET", "/v1/health/connect/web", None), ("GET", "/v1/health/ingress/web", None)],
    # sessions (Consul's session:write on the node to create, renew, destroy; session:read to see)
    "session.create_session": [("PUT", "/v1/session/create", b'{"Name": "s"}'),
                               ("PUT", "/v1/session/create?dc=global", b"{}")],
    "session.destroy_session": [("PUT", "/v1/session/destroy/0c3c5a0e-0000-4000-8000-000000000000", None)],
    "session.renew_session": [("PUT", "/v1/session/renew/0c3c5a0e-0000-4000-8000-000000000000", None)],
    "session.session_info": [("GET", "/v1/session/info/0c3c5a0e-0000-4000-8000-000000000000", None)],
    "session.node_sessions": [("GET", "/v1/session/node/n1", None)],
    "session.list_sessions": [("GET", "/v1/session/list", None)],
    # snapshots: a management token only
    "snapshot.save_snapshot": [("GET", "/v1/snapshot", None)],
    "snapshot.restore_snapshot": [("PUT", "/v1/snapshot", b"not a snapshot")],
    # User events (issue 17): event:write on the name to fire; the list shows only event:read names.
    "event.fire": [("PUT", "/v1/event/fire/deploy", b"v1"), ("PUT", "/v1/event/fire/deploy?dc=global", None)],
    "event.list_events": [("GET", "/v1/event/list", None), ("GET", "/v1/event/list?name=deploy", None)],
}
HUB_ROUTES = {
    "hub_fleet.sites": [("GET", "/v1/sites", None)],
    "hub_fleet.site_credential": [("PUT", "/v1/sites/plant-9", None), ("DELETE", "/v1/sites/plant-9", None)],
}


def all_endpoints() -> set[str]:
    """Every endpoint the edge's and the hub's apps route to (built the way create_app builds them)."""
    return RouteTable((*http_app.ROUTES, sync_api, fleet_api)).endpoints()


def test_the_route_table_covers_every_route():
    # A new route must be added here (and so get its anonymous check below).
    missing = all_endpoints() - set(ROUTES) - set(HUB_ROUTES) - OPEN - {"hub_sync.sync_socket"}
    assert not missing, f"routes with no ACL test: {sorted(missing)}"


def test_every_route_is_classified_in_authz():
    endpoints = all_endpoints() - {"hub_sync.sync_socket"}  # the WebSocket checks in its handler
    classified = OPEN | set(ROUTE_ACCESS) | CHECKED_IN_ROUTE
    assert endpoints - classified == set(), "routes that only a management token may call"
    assert classified - endpoints == set(), "names in authz.py that no route has"


def shows_nothing(response: httpx.Response) -> bool:
    """Refused, or a list answer filtered down to nothing (Consul's behaviour for list reads)."""
    if response.status_code in (401, 403):
        return response.json()["error"] in ("permission_denied", "acl_not_found")
    if response.status_code == 404:
        return response.content in (b"", b"[]", b"{}") or response.json().get("error") == "not_found"
    if response.status_code == 200:
        return response.json() in ([], {})
    return False


@pytest.fixture(scope="module")
def acl_edge(tmp_path_factory):
    edge = EdgeProcess(tmp_path_factory.mktemp("enforced"), acl=True)
    with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as admin:
        # Something to hide on every list route.
        assert admin.put("/v1/kv/app/a", content=b"1").json() is True
        assert admin.put("/v1/kv/other/b", content=b"2").json() is True
        service = {"Name": "web", "Port": 80, "Check": {"TTL": "30s"}}
        assert admin.put("/v1/agent/service/register", json=service).status_code == 200
        assert admin.put("/v1/devices/d1", json={"Type": "sensor"}).status_code in (200, 201)
        assert admin.put("/v1/session/create", json={"Name": "held"}).status_code == 200
    yield edge
    edge.stop()


@pytest.fixture
def admin(acl_edge):
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers=ADMIN) as client:
        yield client


def make_token(client: httpx.Client, name: str, rules: str) -> str:
    policy = client.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
    assert policy.status_code == 200, policy.text
    token = client.put("/v1/acl/token", json={"Policies": [{"Name": name}]})
    assert token.status_code == 200, token.text
    return token.json()["SecretID"]


@pytest.mark.parametrize("token", [None, "00000000-1111-2222-3333-444444444444"], ids=["anonymous", "unknown"])
def test_every_route_refuses_a_request_without_a_valid_token(acl_edge, admin, token):
    headers = {"X-Consul-Token": token} if token else {}
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers=headers) as client:
        for endpoint, requests in ROUTES.items():
            for method, path, body in requests:
                response = client.request(method, path, content=body)
                assert shows_nothing(response), (endpoint, method, path, response.status_code, response.text)
    # Nothing was changed by any of it.
    assert admin.get("/v1/kv/app/a?raw").content == b"1"
    assert "web" in admin.get("/v1/catalog/services").json()
    assert admin.get("/v1/devices/d1").status_code == 200
    # What needs no token still answers.
    with httpx.Client(base_url=acl_edge.url, timeout=10) as anonymous:
        assert anonymous.get("/health/ready").status_code == 200
        assert anonymous.get("/v1/status/leader").status_code == 200


def test_a_key_prefix_policy_allows_exactly_its_prefix_on_every_kv_path(acl_edge, admin):
    secret = make_token(admin, "app-writer", 'key_prefix "app/" { policy = "write" }')
    auth = {"X-Consul-Token": secret}
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers=auth) as client:
        # The plain PUT/GET take the fast path; ?flags= and ?cas= the app; both check alike.
        assert client.put("/v1/kv/app/x", content=b"1").json() is True
        assert client.put("/v1/kv/app/x?flags=7", content=b"2").json() is True
        assert client.get("/v1/kv/app/x?raw").content == b"2"
        for refused in (client.put("/v1/kv/other/x", content=b"1"), client.put("/v1/kv/other/x?flags=1", content=b"1"),
                        client.get("/v1/kv/other/b"), client.get("/v1/kv/other/b?raw"), client.delete("/v1/kv/other/b"),
                        client.put("/v1/kv/appx", content=b"1"), client.delete("/v1/kv/?recurse")):
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "permission_denied" and "key:" in refused.json()["detail"]
        # Bearer and ?token= name the same token.
        assert httpx.put(f"{acl_edge.url}/v1/kv/app/y", content=b"1", headers={"Authorization": f"Bearer {secret}"}).json()
        assert httpx.put(f"{acl_edge.url}/v1/kv/app/z?token={secret}", content=b"1").json() is True
        # A transaction is all or nothing, for ACLs too.
        mixed = [{"KV": {"Verb": "set", "Key": "app/t", "Value": "MQ=="}}, {"KV": {"Verb": "set", "Key": "other/t", "Value": "MQ=="}}]
        assert client.put("/v1/txn", json=mixed).status_code == 403
        assert admin.get("/v1/kv/app/t").status_code == 404
        assert client.put("/v1/txn", json=mixed[:1]).status_code == 200
        # A recursive delete of its own prefix is allowed.
        assert client.delete("/v1/kv/app/?recurse").json() is True
    assert admin.get("/v1/kv/other/b?raw").content == b"2"
    assert admin.put("/v1/kv/app/a", content=b"1").json() is True  # restore for the other tests


def test_globs_match_one_segment_or_any_depth(acl_edge, admin):
    secret = make_token(admin, "globs", """
        key "sites/*/config" { policy = "write" }
        key_prefix "fleet/**/fw/" { policy = "write" }
        key "sites/s9/config" { policy = "deny" }
    """)
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers={"X-Consul-Token": secret}) as client:
        assert client.put("/v1/kv/sites/s1/config", content=b"1").status_code == 200
        assert client.put("/v1/kv/sites/s1/x/config", content=b"1").status_code == 403  # * is one segment
        assert client.put("/v1/kv/sites/s9/config", content=b"1").status_code == 403  # exact deny wins
        assert client.put("/v1/kv/fleet/a/b/c/fw/img", content=b"1").status_code == 200  # ** any depth
        assert client.put("/v1/kv/fleet/fw/img", content=b"1").status_code == 200
        assert client.put("/v1/kv/fleet/a/other", content=b"1").status_code == 403


def test_list_reads_are_filtered_to_what_the_token_may_read(acl_edge, admin):
    secret = make_token(admin, "app-reader", 'key_prefix "app/" { policy = "read" }\nservice "web" { policy = "read" }')
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers={"X-Consul-Token": secret}) as client:
        listed = client.get("/v1/kv/?recurse")
        assert listed.status_code == 200
        assert {e["Key"] for e in listed.json()} == {"app/a"}
        assert listed.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
        assert client.get("/v1/kv/?keys").json() == ["app/a"]
        assert client.get("/v1/kv/other/?recurse").status_code == 404  # nothing readable there
        assert client.get("/v1/catalog/services").json() == {"web": []}
        # service:read on web, but no node:read: instances are hidden, as in Consul.
        assert client.get("/v1/catalog/service/web").json() == []
    everything = admin.get("/v1/kv/?recurse")
    assert {"app/a", "other/b"} <= {e["Key"] for e in everything.json()}
    assert "X-Consul-Results-Filtered-By-ACLs" not in everything.headers


def test_services_and_agent_routes_follow_service_and_agent_rules(acl_edge, admin):
    secret = make_token(admin, "svc", 'service_prefix "api" { policy = "write" }\nagent_prefix "" { policy = "read" }')
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers={"X-Consul-Token": secret}) as client:
        assert client.put("/v1/agent/service/register", json={"Name": "api-1", "Port": 1}).status_code == 200
        assert client.put("/v1/agent/service/register", json={"Name": "web", "Port": 2}).status_code == 403
        assert client.get("/v1/agent/self").status_code == 200
        assert set(client.get("/v1/agent/services").json()) == {"api-1"}
        assert client.put("/v1/agent/service/deregister/api-1").status_code == 200
        assert client.get("/metrics").status_code == 200  # agent:read
        assert client.get("/v1/sync/status").status_code == 403  # operator:read


def test_rate_limits_answer_429_with_retry_after_and_recover(tmp_path):
    edge = EdgeProcess(tmp_path / "limited", acl=True,
                       extra=["--http-rate-per-token", "5", "--http-burst-per-token", "5"])
    try:
        with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as client:
            answers = [client.put("/v1/kv/k", content=b"1") for _ in range(12)]  # the fast path
            answers += [client.get("/v1/catalog/services") for _ in range(6)]  # the app
            limited = [a for a in answers if a.status_code == 429]
            assert limited, [a.status_code for a in answers]
            assert all(int(a.headers["Retry-After"]) >= 1 and a.json()["error"] == "rate_limited" for a in limited)
            eventually(lambda: client.put("/v1/kv/k", content=b"2").status_code == 200, what="the bucket refilled")
            metrics = client.get("/metrics")
            eventually(lambda: client.get("/metrics").status_code == 200, what="metrics")
            assert "konsul_rate_limited_total" in client.get("/metrics").text or metrics.status_code == 429
        # Another token has a bucket of its own.
        assert httpx.get(f"{edge.url}/health/ready").status_code == 200
    finally:
        edge.stop()


def test_writes_and_refusals_are_audited_without_secrets(tmp_path):
    edge = EdgeProcess(tmp_path / "audited", acl=True)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            assert client.put("/v1/kv/a", content=b"1", headers=ADMIN).status_code == 200
            assert client.put("/v1/kv/a?flags=1", content=b"1", headers=ADMIN).status_code == 200
            assert client.put("/v1/kv/b", content=b"1").status_code == 403
            assert client.get("/v1/kv/a?token=" + "1" * 36).status_code == 403
            me = client.get("/v1/acl/token/self", headers=ADMIN).json()["AccessorID"]
        log = edge.data_dir / "audit.log"

        def lines():
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        eventually(lambda: len(lines()) >= 4, what="four audit lines")
        events = lines()
        assert {(e["operation"], e["resource"], e["result"], e["accessor"]) for e in events} >= {
            ("kv:write", "/v1/kv/a", "allowed", me),
            ("kv:write", "/v1/kv/b", "denied", "anonymous"),
        }
        assert all(e["source"] == "127.0.0.1" and e["interface"] == "http" for e in events)
        assert MANAGEMENT_TOKEN not in log.read_text() and "1" * 36 not in log.read_text()
        metrics = httpx.get(f"{edge.url}/metrics", headers=ADMIN).text
        assert 'konsul_acl_refusals_total{interface="http",reason="permission_denied"} 1.0' in metrics
        assert 'konsul_acl_refusals_total{interface="http",reason="acl_not_found"} 1.0' in metrics
        assert 'konsul_audit_events_total{interface="http",result="denied"} 2.0' in metrics
    finally:
        edge.stop()


def test_the_hub_refuses_anonymous_requests_and_sync_without_an_operator_token(tmp_path):
    hub = HubProcess(tmp_path / "hub", acl=True)
    try:
        with httpx.Client(base_url=hub.url, timeout=10) as anonymous:
            for endpoint, requests in {**ROUTES, **HUB_ROUTES}.items():
                for method, path, body in requests:
                    if endpoint.startswith("agent.") and method != "GET":
                        continue  # an edge's own services; the hub has none to register
                    response = anonymous.request(method, path.replace("/v1/kv/", "/v1/kv/", 1), content=body)
                    assert shows_nothing(response), (endpoint, method, path, response.status_code, response.text)
            # The sync WebSocket's handshake is refused before anything opens.
            upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            assert anonymous.get("/v1/sync", headers=upgrade).status_code == 401
        # An edge syncing with its site's join token gets through; one without does not.
        edge = EdgeProcess(tmp_path / "edge", hub_url=hub.url, acl=True, extra=["--site-token", join_token(hub, "s1")])
        stranger = EdgeProcess(tmp_path / "stranger", site="s2", hub_url=hub.url, acl=True)
        try:
            with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as client:
                assert client.put("/v1/kv/synced", content=b"1").json() is True
            eventually(lambda: httpx.get(f"{hub.url}/v1/kv/synced?dc=s1&raw", headers=ADMIN).content == b"1",
                       what="the edge's write at the hub")
            status = httpx.get(f"{stranger.url}/v1/sync/status", headers=ADMIN).json()
            eventually(lambda: httpx.get(f"{stranger.url}/v1/sync/status", headers=ADMIN).json()["Peers"][0]["LastError"],
                       what="the stranger's refusal")
            assert not status["Peers"][0]["Connected"]
            assert httpx.get(f"{hub.url}/v1/catalog/datacenters").json() == ["s1"]  # s2 was never created
        finally:
            edge.stop()
            stranger.stop()
    finally:
        hub.stop()


def test_the_hub_never_takes_fleet_wide_acl_records_from_an_edge(tmp_path):
    # An edge run standalone first is its own authority: it makes a global policy and token.
    alone = EdgeProcess(tmp_path / "edge", acl=True)
    try:
        with httpx.Client(base_url=alone.url, timeout=10, headers=ADMIN) as client:
            assert client.put("/v1/acl/policy", json={"Name": "edge-made", "Rules": 'key_prefix "" { policy = "write" }'}).status_code == 200
            made = client.put("/v1/acl/token", json={"Policies": [{"Name": "edge-made"}]}).json()
            assert client.put("/v1/kv/before-hub", content=b"1").json() is True
    finally:
        alone.stop()
    hub = HubProcess(tmp_path / "hub", acl=True)
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub.url, acl=True, extra=["--site-token", join_token(hub, "s1")])
    try:
        hub_admin = httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN)
        # Its data syncs; its fleet-wide ACL records do not, and the session goes on.
        eventually(lambda: hub_admin.get("/v1/kv/before-hub?dc=s1&raw").content == b"1", what="the edge's data at the hub")
        with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as client:
            assert client.put("/v1/kv/after", content=b"2").json() is True
            # Now that it has a hub, it makes no more fleet-wide records itself.
            refused = client.put("/v1/acl/policy", json={"Name": "late", "Rules": ""})
            assert refused.status_code == 403 and refused.json()["error"] == "acl_global_at_hub"
            assert client.put("/v1/acl/token", json={"Local": True}).status_code == 200  # site-local ones it does
        eventually(lambda: hub_admin.get("/v1/kv/after?dc=s1&raw").content == b"2", what="later writes at the hub")
        assert hub_admin.get("/v1/acl/policy/name/edge-made").status_code == 404
        assert hub.url and httpx.get(f"{hub.url}/v1/kv/after?dc=s1", headers={"X-Consul-Token": made["SecretID"]}).status_code == 403
        assert "refused a peer's change to global/acl" in hub.output
        hub_admin.close()
    finally:
        edge.stop()
        hub.stop()


def test_made_up_tokens_from_one_address_are_rate_limited_too(tmp_path):
    # The address is charged before the secret is looked up: guessing secrets costs the guesser.
    edge = EdgeProcess(tmp_path / "guessed", acl=True,
                       extra=["--http-rate-per-source", "5", "--http-burst-per-source", "5"])
    try:
        guesses = [
            httpx.get(f"{edge.url}/v1/kv/k{path}", headers={"X-Consul-Token": f"00000000-0000-4000-8000-{n:012d}"})
            for n, path in enumerate(["", "?flags=1"] * 6)  # the fast path and the app alike
        ]
        assert {g.status_code for g in guesses} == {403, 429}, [g.status_code for g in guesses]
        assert all(g.json()["error"] in ("acl_not_found", "rate_limited") for g in guesses)
    finally:
        edge.stop()

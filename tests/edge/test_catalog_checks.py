"""Checks, maintenance, nodes, members and ?filter= against a real edge with py-consul, httpx and curl."""

from __future__ import annotations

import json
import subprocess

import consul
import httpx
import pytest

from agents import EdgeProcess, HubProcess, eventually


@pytest.fixture
def client(edge):
    return consul.Consul(host=edge.host, port=edge.port)


def put(edge, path: str, body=None) -> httpx.Response:
    return httpx.put(f"{edge.url}{path}", json=body, timeout=10)


def test_agent_checks_on_the_node_and_on_a_service(edge, client):
    # A node-level TTL check, py-consul's way.
    assert client.agent.check.register("disk", consul.Check.ttl("30s"), check_id="disk", notes="root fs") is True
    disk = client.agent.checks()["disk"]
    assert (disk["Status"], disk["ServiceID"], disk["Notes"], disk["Type"]) == ("critical", "", "root fs", "ttl")
    client.agent.check.ttl_pass("disk", notes="42% used")
    assert client.agent.checks()["disk"]["Output"] == "42% used"

    # Several checks of one service are numbered, as Consul numbers them.
    client.agent.service.register("multi", check=consul.Check.ttl("30s"), extra_checks=[consul.Check.ttl("30s")])
    assert {"service:multi:1", "service:multi:2"} <= set(client.agent.checks())
    client.agent.service.deregister("multi")

    # A check added to a registered service.
    client.agent.service.register("api", port=8080, check=consul.Check.ttl("30s"))
    assert client.agent.check.register("api-alive", consul.Check.ttl("30s"), service_id="api") is True
    alive = client.agent.checks()["api-alive"]
    assert (alive["ServiceID"], alive["ServiceName"]) == ("api", "api")
    client.agent.check.ttl_pass("service:api")
    client.agent.check.ttl_pass("api-alive")
    assert [n["Service"]["ID"] for n in client.health.service("api", passing=True)[1]] == ["api"]

    # Consul's /v1/agent/check/update sets status and output.
    assert put(edge, "/v1/agent/check/update/api-alive", {"Status": "warning", "Output": "slow"}).status_code == 200
    assert client.agent.checks()["api-alive"]["Status"] == "warning"
    assert client.agent.checks()["api-alive"]["Output"] == "slow"
    assert client.health.service("api", passing=True)[1] == []
    client.agent.check.ttl_pass("api-alive")

    # The node's health: serfHealth (the agent is alive), the node check, the service's checks.
    _, node_health = client.health.node("n1")
    by_id = {c["CheckID"]: c for c in node_health}
    assert by_id["serfHealth"]["Status"] == "passing" and by_id["serfHealth"]["ServiceID"] == ""
    assert {"serfHealth", "disk", "service:api", "api-alive"} <= set(by_id)

    # A critical node check takes every service of the node out of ?passing.
    client.agent.check.ttl_fail("disk", notes="full")
    assert client.health.service("api", passing=True)[1] == []
    assert "disk" in [c["CheckID"] for c in client.health.state("critical")[1]]
    assert client.agent.check.deregister("disk") is True
    assert "disk" not in client.agent.checks()
    assert [n["Service"]["ID"] for n in client.health.service("api", passing=True)[1]] == ["api"]

    # Refusals say what to do, and change nothing.
    for path, body, status, detail in [
        ("/v1/agent/check/register", {"Name": "x"}, 400, "needs exactly one of TTL, HTTP or TCP"),
        ("/v1/agent/check/register", {"Name": "x", "TTL": "5s", "ServiceID": "nope"}, 404, "register it first"),
        ("/v1/agent/check/register", {"Name": "x", "TTL": "5s", "Status": "great"}, 400, "Status is one of"),
        ("/v1/agent/check/update/api-alive", {"Status": "great"}, 400, "Status is one of"),
        ("/v1/agent/check/pass/serfHealth", None, 400, "not a TTL check"),
        ("/v1/agent/check/deregister/serfHealth", None, 400, "cannot be deregistered"),
        ("/v1/agent/check/deregister/nope", None, 404, "no check 'nope'"),
    ]:
        answer = put(edge, path, body)
        assert answer.status_code == status, (path, answer.text)
        assert detail in answer.json()["detail"], answer.text
    assert set(client.agent.checks()) == {"service:api", "api-alive"}  # serfHealth is the catalog's, as in Consul


def test_maintenance_mode_of_a_service_and_of_the_node(edge, client):
    client.agent.service.register("web", service_id="web-1", port=80, check=consul.Check.ttl("30s"))
    client.agent.check.ttl_pass("service:web-1")
    assert len(client.health.service("web", passing=True)[1]) == 1

    assert client.agent.service.maintenance("web-1", "true", reason="upgrading") is True
    maintenance = client.agent.checks()["_service_maintenance:web-1"]
    assert (maintenance["Status"], maintenance["Notes"]) == ("critical", "upgrading")
    assert client.health.service("web", passing=True)[1] == []
    assert client.agent.service.maintenance("web-1", "false") is True
    assert "_service_maintenance:web-1" not in client.agent.checks()
    assert len(client.health.service("web", passing=True)[1]) == 1

    assert client.agent.maintenance("true", reason="rack move") is True
    assert "_node_maintenance" in [c["CheckID"] for c in client.health.node("n1")[1]]
    assert client.health.service("web", passing=True)[1] == []
    assert put(edge, "/v1/agent/maintenance").status_code == 400  # enable= is required

    # Maintenance is durable: the agent comes back still in maintenance.
    edge.stop()
    again = EdgeProcess(edge.data_dir)
    try:
        other = consul.Consul(host=again.host, port=again.port)
        assert other.agent.checks()["_node_maintenance"]["Notes"] == "rack move"
        assert other.agent.maintenance("false") is True
        other.agent.check.ttl_pass("service:web-1")
        assert len(other.health.service("web", passing=True)[1]) == 1
    finally:
        again.stop()


def test_agent_self_and_members(shared_edge):
    client = consul.Consul(host=shared_edge.host, port=shared_edge.port)
    me = client.agent.self()
    assert me["Config"]["Datacenter"] == "s1" and me["Config"]["NodeName"] == "n1"
    assert me["Config"]["Server"] is False and me["Config"]["Version"].count(".") == 2
    stats = me["Stats"]
    assert {"agent", "build", "consul", "runtime"} <= set(stats)
    assert all(isinstance(v, str) for section in stats.values() for v in section.values())
    assert stats["consul"]["server"] == "false" and int(stats["agent"]["services"]) >= 0
    assert set(me) == {"Config", "DebugConfig", "Coord", "xDS", "Member", "Meta", "Stats"}  # as py-consul's suite expects
    members = client.agent.members()
    assert [(m["Name"], m["Status"], m["Tags"]["dc"]) for m in members] == [("n1", 1, "s1")]
    assert me["Member"] in members
    assert [m["Name"] for m in client.agent.members(wan=True)] == ["n1.s1"]


def test_catalog_register_an_external_node(edge, client):
    service = {"Service": "modbus", "ID": "modbus-1", "Port": 502, "Tags": ["line1"]}
    check = {"CheckID": "modbus-ok", "Name": "modbus", "Status": "passing", "ServiceID": "modbus-1", "Output": "ok"}
    assert client.catalog.register("plc-1", "10.0.0.9", service=service, check=check, node_meta={"zone": "a"}) is True

    _, node = client.catalog.node("plc-1")
    assert node["Node"]["Address"] == "10.0.0.9" and node["Node"]["Meta"] == {"zone": "a"}
    assert node["Services"]["modbus-1"]["Port"] == 502
    _, zone_a = client.catalog.nodes(node_meta={"zone": "a"})
    assert [n["Node"] for n in zone_a] == ["plc-1"]
    assert {"n1", "plc-1"} <= {n["Node"] for n in client.catalog.nodes()[1]}
    services = httpx.get(f"{edge.url}/v1/catalog/node-services/plc-1").json()
    assert [s["ID"] for s in services["Services"]] == ["modbus-1"]

    # Its check's status is the one registered (nobody runs it).
    healthy = client.health.service("modbus", passing=True)[1]
    assert [(h["Node"]["Node"], h["Checks"][0]["Output"]) for h in healthy] == [("plc-1", "ok")]
    assert client.catalog.register("plc-1", "10.0.0.9", check={**check, "Status": "critical"}) is True
    assert client.health.service("modbus", passing=True)[1] == []
    assert [c["CheckID"] for c in client.health.node("plc-1")[1]] == ["modbus-ok"]

    # A node check of its own, then deregistration step by step.
    client.catalog.register("plc-1", "10.0.0.9", check={"CheckID": "power", "Name": "power", "Status": "passing"})
    assert {c["CheckID"] for c in client.health.node("plc-1")[1]} == {"power", "modbus-ok"}
    assert client.catalog.deregister("plc-1", check_id="power") is True
    assert client.catalog.deregister("plc-1", service_id="modbus-1") is True
    assert client.catalog.service("modbus")[1] == []
    assert client.catalog.deregister("plc-1") is True
    assert client.catalog.node("plc-1")[1] is None

    # The agent's own node stays.
    refused = put(edge, "/v1/catalog/deregister", {"Node": "n1"})
    assert refused.status_code == 400 and "own node" in refused.json()["detail"]
    assert put(edge, "/v1/catalog/register", {"Node": "x"}).status_code == 400  # Address is required
    assert client.catalog.node("n1")[1]["Node"]["Node"] == "n1"


def test_service_fields_are_kept_through_register_and_read(edge, client):
    client.agent.service.register(
        "gw", service_id="gw-1", port=443, enable_tag_override=True,
        tagged_addresses={"lan": {"Address": "10.1.1.1", "Port": 8443}, "wan": {"address": "203.0.113.7", "port": 443}},
    )
    assert put(edge, "/v1/agent/service/register", {"Name": "mesh", "Kind": "mesh-gateway", "Port": 8443}).status_code == 200
    gw = client.agent.services()["gw-1"]
    assert gw["EnableTagOverride"] is True
    assert gw["TaggedAddresses"] == {"lan": {"Address": "10.1.1.1", "Port": 8443}, "wan": {"Address": "203.0.113.7", "Port": 443}}
    assert client.agent.services()["mesh"]["Kind"] == "mesh-gateway"
    assert client.agent.service_definition("gw-1")["TaggedAddresses"]["lan"]["Port"] == 8443
    assert httpx.get(f"{edge.url}/v1/agent/service/nope").status_code == 404
    instance = client.catalog.service("gw")[1][0]
    assert instance["ServiceEnableTagOverride"] is True
    assert instance["ServiceTaggedAddresses"]["lan"] == {"Address": "10.1.1.1", "Port": 8443}
    assert client.catalog.service("mesh")[1][0]["ServiceKind"] == "mesh-gateway"
    assert client.health.service("gw")[1][0]["Service"]["TaggedAddresses"]["wan"]["Address"] == "203.0.113.7"
    bad = put(edge, "/v1/agent/service/register", {"Name": "x", "TaggedAddresses": {"lan": "10.0.0.1"}})
    assert bad.status_code == 400 and "TaggedAddresses" in bad.json()["detail"]


def test_filters_tags_node_meta_and_near(edge, client):
    for sid, tags, env, passing in [("web-1", ["v1", "blue"], "prod", True), ("web-2", ["v2"], "prod", True),
                                    ("web-3", ["v1"], "dev", True), ("web-4", ["v1"], "prod", False)]:
        client.agent.service.register("web", service_id=sid, port=80, tags=tags, meta={"env": env},
                                      check=consul.Check.ttl("30s"))
        if passing:
            client.agent.check.ttl_pass(f"service:{sid}")
    expression = 'Service.Tags contains "v1" and Service.Meta.env == "prod"'
    # Unhealthy instances are left out of ?passing, whatever the filter.
    _, found = client.health.service("web", passing=True, filter_expr=expression)
    assert [n["Service"]["ID"] for n in found] == ["web-1"]
    _, found = client.health.service("web", filter_expr=expression)
    assert [n["Service"]["ID"] for n in found] == ["web-1", "web-4"]
    assert set(client.agent.services(filter_expr='Tags contains "v1" and Meta.env == "prod"')) == {"web-1", "web-4"}
    _, found = client.catalog.service("web", filter_expr='ServiceMeta.env == dev or "v2" in ServiceTags')
    assert [s["ServiceID"] for s in found] == ["web-2", "web-3"]
    assert set(client.agent.checks(filter_expr='Status == "critical"')) == {"service:web-4"}
    _, found = client.health.state("any", filter_expr='ServiceID matches "^web-[12]$"')
    assert sorted(c["ServiceID"] for c in found) == ["web-1", "web-2"]
    _, found = client.health.checks("web", filter_expr="ServiceTags not contains v1")
    assert [c["ServiceID"] for c in found] == ["web-2"]
    _, nodes = client.catalog.nodes(filter_expr='Node == "n1"')
    assert [n["Node"] for n in nodes] == ["n1"]
    # Instances are filtered, then their tags gathered (as Consul does).
    assert client.catalog.services(filter_expr="ServiceTags contains v2")[1] == {"web": ["v2"]}

    # ?tag= repeats (all must match); ?near=_agent, ?stale and ?consistent are accepted.
    tagged = httpx.get(f"{edge.url}/v1/catalog/service/web", params=[("tag", "v1"), ("tag", "blue")]).json()
    assert [s["ServiceID"] for s in tagged] == ["web-1"]
    for extra in ("near=_agent", "stale", "consistent"):
        assert httpx.get(f"{edge.url}/v1/health/service/web?{extra}").status_code == 200
    # No cluster peers, no service mesh: a named peer, Connect and ingress hold nothing.
    assert client.health.service("web", peer="elsewhere")[1] == []
    assert client.health.connect("web")[1] == [] and client.health.ingress("web")[1] == []

    # A bad expression is a 400 that says what is wrong (curl, as a shell user would send it).
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--get", f"{edge.url}/v1/health/service/web",
         "--data-urlencode", "filter=Service.Colour == red"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "400"
    assert json.loads(body)["error"] == "invalid_filter" and "unknown selector 'Service.Colour'" in json.loads(body)["detail"]
    bad = httpx.get(f"{edge.url}/v1/agent/services", params={"filter": 'Tags contains "v1" and'})
    assert bad.status_code == 400 and "expected a selector" in bad.json()["detail"]
    assert httpx.get(f"{edge.url}/v1/catalog/nodes", params={"node-meta": "nocolon"}).status_code == 400


def test_the_hub_lists_sites_as_members_and_knows_their_liveness(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub.url)
    try:
        hub_client = consul.Consul(host=hub.host, port=hub.port)

        def edge_member():
            found = [m for m in hub_client.agent.members() if m["Tags"].get("site") == "s1"]
            return found[0] if found and found[0]["Status"] == 1 and found[0]["Name"] == "n1" else None

        member = eventually(edge_member, what="the edge's node as a live member at the hub")
        assert member["Tags"]["konsul_role"] == "edge"
        assert hub_client.agent.members()[0]["Tags"]["role"] == "consul"  # the hub itself
        assert hub_client.agent.self()["Config"]["Server"] is True

        def serf_status():
            checks = httpx.get(f"{hub.url}/v1/health/node/n1?dc=s1").json()
            return {c["CheckID"]: c["Status"] for c in checks}.get("serfHealth")

        eventually(lambda: serf_status() == "passing", what="serfHealth passing at the hub")
        # Service fields reach the hub as registered.
        gateway = {"Name": "gw", "Kind": "mesh-gateway", "EnableTagOverride": True,
                   "TaggedAddresses": {"wan": {"Address": "203.0.113.7", "Port": 443}}}
        assert httpx.put(f"{edge.url}/v1/agent/service/register", json=gateway).status_code == 200
        eventually(lambda: httpx.get(f"{hub.url}/v1/catalog/service/gw?dc=s1").json(), what="gw at the hub")
        at_hub = httpx.get(f"{hub.url}/v1/catalog/service/gw?dc=s1").json()[0]
        assert (at_hub["ServiceKind"], at_hub["ServiceEnableTagOverride"]) == ("mesh-gateway", True)
        assert at_hub["ServiceTaggedAddresses"] == {"wan": {"Address": "203.0.113.7", "Port": 443}}
        # An external node registered at the hub for the site reaches the site's edge.
        plc = {"Node": "plc-7", "Address": "10.0.0.7", "Service": {"Service": "opcua", "Port": 4840}}
        assert httpx.put(f"{hub.url}/v1/catalog/register?dc=s1", json=plc).json() is True
        eventually(lambda: httpx.get(f"{edge.url}/v1/catalog/node/plc-7").status_code == 200, what="plc-7 at the edge")
        assert [s["Service"] for s in httpx.get(f"{edge.url}/v1/catalog/node-services/plc-7").json()["Services"]] == ["opcua"]
        edge.stop()
        eventually(lambda: serf_status() == "critical", what="serfHealth critical once the edge is gone")
        eventually(lambda: [m["Status"] for m in hub_client.agent.members() if m["Name"] == "n1"] == [4],
                   what="the member failed")
    finally:
        edge.stop()
        hub.stop()


def test_check_writes_need_the_service_or_the_node(tmp_path):
    from agents import MANAGEMENT_TOKEN

    edge = EdgeProcess(tmp_path / "acl", acl=True)
    try:
        admin = httpx.Client(base_url=edge.url, timeout=10, headers={"X-Consul-Token": MANAGEMENT_TOKEN})

        def token(rules: str) -> dict[str, str]:
            name = f"p{abs(hash(rules))}"
            assert admin.put("/v1/acl/policy", json={"Name": name, "Rules": rules}).status_code == 200
            secret = admin.put("/v1/acl/token", json={"Policies": [{"Name": name}]}).json()["SecretID"]
            return {"X-Consul-Token": secret}

        assert admin.put("/v1/agent/service/register", json={"Name": "api", "Port": 1}).status_code == 200
        api_writer = token('service "api" { policy = "write" }')
        node_writer = token('node "n1" { policy = "write" }')
        ttl = {"Name": "c", "TTL": "30s"}
        assert httpx.put(f"{edge.url}/v1/agent/check/register", json={**ttl, "ServiceID": "api"}, headers=api_writer).status_code == 200
        for path, body in [("/v1/agent/check/register", ttl), ("/v1/agent/maintenance?enable=true", None),
                           ("/v1/catalog/register", {"Node": "plc", "Address": "10.0.0.1"})]:
            refused = httpx.put(f"{edge.url}{path}", json=body, headers=api_writer)
            assert refused.status_code == 403 and "node:write" in refused.json()["detail"], refused.text
        assert httpx.put(f"{edge.url}/v1/agent/check/register", json={**ttl, "CheckID": "n"}, headers=node_writer).status_code == 200
        assert httpx.put(f"{edge.url}/v1/agent/service/maintenance/api?enable=true", headers=node_writer).status_code == 403
        assert httpx.put(f"{edge.url}/v1/agent/service/maintenance/api?enable=true", headers=api_writer).status_code == 200
        # Members and node reads follow node:read.
        assert httpx.get(f"{edge.url}/v1/agent/members", headers=api_writer).json() == []
        assert [m["Name"] for m in httpx.get(f"{edge.url}/v1/agent/members", headers=node_writer).json()] == ["n1"]
        assert httpx.get(f"{edge.url}/v1/health/node/n1", headers=api_writer).json() == []
        admin.close()
    finally:
        edge.stop()

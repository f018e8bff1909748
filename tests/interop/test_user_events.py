"""User events (/v1/event) across a real hub and edges: py-consul, blocking lists, MQTT devices."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from pathlib import Path

import consul
import httpx
import pytest

from agents import EdgeProcess, HubProcess, eventually
from test_mqtt_embedded import Device, register

from konsul.sync.events import uuid_index


def connected(edge: EdgeProcess) -> bool:
    peers = httpx.get(f"{edge.url}/v1/sync/status", timeout=5).json()["Peers"]
    return bool(peers) and peers[0]["Connected"]


def names(url: str, **params) -> list[str]:
    return [e["Name"] for e in httpx.get(f"{url}/v1/event/list", params=params, timeout=10).json()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A hub and two edges (s1 with MQTT for devices, s2), ACLs off."""
    root = tmp_path_factory.mktemp("events")
    hub = HubProcess(root / "hub")
    s1 = EdgeProcess(root / "s1", site="s1", hub_url=hub.url, extra=["--mqtt-addr", "127.0.0.1:0"])
    s2 = EdgeProcess(root / "s2", site="s2", hub_url=hub.url)
    edges = {"s1": s1, "s2": s2}
    try:
        eventually(lambda: connected(s1) and connected(s2), what="both edges synced")
        yield hub, edges
    finally:
        for edge in edges.values():
            edge.stop()
        hub.stop()


def test_an_event_fired_at_the_hub_reaches_a_blocked_list_at_the_edge_and_a_device(fleet):
    hub, edges = fleet
    s1 = edges["s1"]
    with httpx.Client(base_url=s1.url, timeout=10) as http:
        token = register(http, "panel-1")
    device = Device(s1.mqtt_addr()[1], "panel-1", token)
    try:
        assert device.connected() == 0
        assert device.subscribe("konsul/v1/events/deploy") == [1]
        agent = consul.Consul(host="127.0.0.1", port=s1.port)
        index, _ = agent.event.list(name="deploy")
        woken: dict = {}
        blocked = threading.Thread(
            target=lambda: woken.update(answer=agent.event.list(name="deploy", index=index, wait="30s"))
        )
        blocked.start()
        fired = consul.Consul(host="127.0.0.1", port=hub.port).event.fire("deploy", "v2.1")
        blocked.join(30)
        assert not blocked.is_alive()
        new_index, events = woken["answer"]
        assert [e["ID"] for e in events][-1] == fired["ID"]
        assert events[-1]["Payload"] == b"v2.1" and events[-1]["Name"] == "deploy"  # py-consul decodes base64
        assert int(new_index) == uuid_index(fired["ID"])  # Consul's index: from the newest event's ID
        message = device.message("konsul/v1/events/deploy")
        published = json.loads(message.payload)
        assert published["ID"] == fired["ID"] and base64.b64decode(published["Payload"]) == b"v2.1"
        # The other edge has it too (fleet-wide), under ?dc=global as well as in its whole list.
        eventually(lambda: "deploy" in names(edges["s2"].url, dc="global"), what="the event at s2")
        assert "deploy" in names(edges["s2"].url)
    finally:
        device.close()


def test_site_events_stay_in_their_site_and_global_ones_from_an_edge_reach_every_edge(fleet):
    hub, edges = fleet
    s1, s2 = edges["s1"], edges["s2"]
    local = httpx.put(f"{s1.url}/v1/event/fire/restart-line", content=b"line 3", timeout=10)
    assert local.status_code == 200 and local.json()["Payload"] == base64.b64encode(b"line 3").decode()
    assert "restart-line" in names(s1.url, dc="s1")
    eventually(lambda: "restart-line" in names(hub.url, dc="s1"), what="the site's event at the hub")
    shout = httpx.put(f"{s1.url}/v1/event/fire/maintenance?dc=global", timeout=10).json()
    eventually(lambda: "maintenance" in names(s2.url, dc="global"), what="the global event at s2")
    assert "maintenance" in names(hub.url)  # the hub lists global's without ?dc
    assert "restart-line" not in names(s2.url) and "restart-line" not in names(hub.url)
    # Each event once everywhere, with the ID it was fired with.
    assert [e["ID"] for e in httpx.get(f"{s2.url}/v1/event/list?name=maintenance").json()] == [shout["ID"]]
    assert [e["ID"] for e in httpx.get(f"{s1.url}/v1/event/list?name=maintenance").json()] == [shout["ID"]]


def test_an_edge_that_was_away_gets_the_recent_events_it_missed(fleet):
    hub, edges = fleet
    s2 = edges["s2"]
    s2.stop()
    missed = httpx.put(f"{hub.url}/v1/event/fire/reload?dc=s2", content=b"cfg-9", timeout=10).json()
    edges["s2"] = s2 = EdgeProcess(s2.data_dir, site="s2", hub_url=hub.url)
    eventually(lambda: missed["ID"] in [e["ID"] for e in httpx.get(f"{s2.url}/v1/event/list?dc=s2").json()],
               what="the missed event replayed to s2")


def test_bad_events_are_refused_and_change_nothing(fleet):
    hub, edges = fleet
    s1 = edges["s1"]
    before = httpx.get(f"{s1.url}/v1/event/list").json()
    for path, body in (
        ("/v1/event/fire/_reserved", b""),
        ("/v1/event/fire/deploy?node=(unclosed", b""),
        ("/v1/event/fire/deploy?tag=v1", b""),  # a tag filter needs a service filter
        ("/v1/event/fire/deploy?dc=s2", b""),  # a site this edge does not hold
    ):
        response = httpx.put(f"{s1.url}{path}", content=body, timeout=10)
        assert response.status_code in (400, 404), (path, response.text)
        assert response.json()["error"] in ("invalid_argument", "not_found")
    too_big = httpx.put(f"{s1.url}/v1/event/fire/deploy", content=b"x" * 5000, timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"] == "value_too_large"
    assert httpx.get(f"{s1.url}/v1/event/list").json() == before


def test_filters_decide_which_edges_take_an_event(fleet):
    hub, edges = fleet
    s1 = edges["s1"]
    assert httpx.put(f"{s1.url}/v1/agent/service/register", json={"Name": "line", "Tags": ["blue"]}).status_code == 200
    for query in ("node=n1", "service=^li", "service=line&tag=^bl", "node=other-node", "service=line&tag=red"):
        assert httpx.put(f"{hub.url}/v1/event/fire/filtered?{query}", timeout=10).status_code == 200
    wanted = ["n1", "^li", "^bl"]

    def taken() -> list[str]:
        events = httpx.get(f"{s1.url}/v1/event/list?name=filtered").json()
        return [e["NodeFilter"] or e["TagFilter"] or e["ServiceFilter"] for e in events]

    eventually(lambda: taken() == wanted, what="the events s1's node and services match")
    assert len(httpx.get(f"{hub.url}/v1/event/list?name=filtered").json()) == 5  # the hub keeps them all


def test_event_list_narrows_by_the_node_service_and_tag_filters_events_were_fired_with(fleet):
    hub, edges = fleet
    for query in ("node=^db-", "service=^web$&tag=^v2$", "service=^web$&tag=^v1$", ""):
        assert httpx.put(f"{hub.url}/v1/event/fire/narrowed?{query}", timeout=10).status_code == 200
    agent = consul.Consul(host="127.0.0.1", port=hub.port)

    def listed(**params) -> list[str]:
        _, events = agent.event.list(name="narrowed", **params)
        return sorted(e["NodeFilter"] + e["ServiceFilter"] + e["TagFilter"] for e in events)

    assert len(listed()) == 4
    assert listed(node="db") == ["^db-"]
    assert listed(service="web") == ["^web$^v1$", "^web$^v2$"]
    assert listed(service="web", tag="v2") == ["^web$^v2$"]
    assert listed(node="db", service="web") == []
    # curl, and a bad expression answers 400 (a blocking list included).
    done = subprocess.run(["curl", "-sS", f"{hub.url}/v1/event/list?name=narrowed&tag=v1"], capture_output=True,
                          timeout=10, check=True)
    assert [e["TagFilter"] for e in json.loads(done.stdout)] == ["^v1$"]
    bad = httpx.get(f"{hub.url}/v1/event/list", params={"node": "(unclosed", "index": "5", "wait": "30s"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_argument"


def test_with_acls_on_a_device_hears_only_events_it_may_read_and_a_fire_needs_event_write(tmp_path):
    from agents import MANAGEMENT_TOKEN

    edge = EdgeProcess(tmp_path / "acl", acl=True, extra=["--mqtt-addr", "127.0.0.1:0"])
    admin = httpx.Client(base_url=edge.url, timeout=10, headers={"X-Consul-Token": MANAGEMENT_TOKEN})
    devices: list[Device] = []
    try:
        rules = {"deploy-reader": 'event "deploy" { policy = "read" }', "deployer": 'event "deploy" { policy = "write" }'}
        for name, rule in rules.items():
            assert admin.put("/v1/acl/policy", json={"Name": name, "Rules": rule}).status_code == 200
        port = edge.mqtt_addr()[1]
        for device_id, policies in (("reader-1", [{"Name": "deploy-reader"}]), ("plain-1", [])):
            reply = admin.put(f"/v1/devices/{device_id}", json={"Type": "sensor", "Policies": policies})
            assert reply.status_code == 201, reply.text
            devices.append(Device(port, device_id, reply.json()["Token"]))
            assert devices[-1].connected() == 0
        reader, plain = devices
        assert reader.subscribe("konsul/v1/events/deploy") == [1]
        assert reader.subscribe("konsul/v1/events/#") == [128]  # a wildcard needs event_prefix "" read
        assert plain.subscribe("konsul/v1/events/deploy") == [128]
        assert reader.subscribe("konsul/v1/events/other") == [128]
        # Firing needs event:write on the name.
        assert httpx.put(f"{edge.url}/v1/event/fire/deploy", timeout=10).status_code == 403
        secret = admin.put("/v1/acl/token", json={"Policies": [{"Name": "deployer"}]}).json()["SecretID"]
        fired = httpx.put(f"{edge.url}/v1/event/fire/deploy", content=b"go", timeout=10,
                          headers={"X-Consul-Token": secret})
        assert fired.status_code == 200, fired.text
        assert json.loads(reader.message("konsul/v1/events/deploy").payload)["ID"] == fired.json()["ID"]
        # The list shows a token only the names it may read.
        assert httpx.get(f"{edge.url}/v1/event/list", timeout=10).json() == []
        assert [e["ID"] for e in admin.get("/v1/event/list").json()] == [fired.json()["ID"]]
    finally:
        for device in devices:
            device.close()
        admin.close()
        edge.stop()


NODE_CLIENTS = Path(__file__).resolve().parent / "node"


def test_node_consul_fires_lists_and_blocks_on_events(tmp_path):
    """node-consul (npm ``consul``, installed by scripts/setup) against a real edge."""
    assert (NODE_CLIENTS / "node_modules" / "consul").is_dir(), "run scripts/setup (npm install in tests/interop/node)"
    edge = EdgeProcess(tmp_path / "edge")
    try:
        result = subprocess.run(["node", str(NODE_CLIENTS / "events.js"), str(edge.port)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["listed"] == [[seen["first"], "v1"]]
        assert seen["woken"] == [[seen["first"], "v1"], [seen["second"], "v2"]]
    finally:
        edge.stop()


def test_a_global_event_from_a_site_that_may_only_read_global_is_dropped_and_counted(tmp_path):
    from agents import MANAGEMENT_TOKEN, join_token

    admin = {"X-Consul-Token": MANAGEMENT_TOKEN}
    hub = HubProcess(tmp_path / "hub", acl=True)
    edge = EdgeProcess(tmp_path / "edge", site="plant-1", hub_url=hub.url, acl=True,
                       extra=["--site-token", join_token(hub, "plant-1", "read")])
    try:
        eventually(lambda: httpx.get(f"{edge.url}/v1/sync/status", headers=admin, timeout=5).json()["Peers"][0]
                   ["Connected"], what="the edge synced")
        fired = httpx.put(f"{edge.url}/v1/event/fire/rollout?dc=global", headers=admin, timeout=10)
        assert fired.status_code == 200, fired.text
        site = httpx.put(f"{edge.url}/v1/event/fire/site-ok", headers=admin, timeout=10).json()

        def metrics() -> str:
            return httpx.get(f"{hub.url}/metrics", headers=admin, timeout=10).text

        eventually(lambda: 'konsul_sync_events_dropped_total{reason="global_read_only"} 1.0' in metrics(),
                   what="the dropped event counted")
        assert "konsul_sync_refused_total{" not in metrics()  # the session was not ended
        # The session goes on: the site's own event still reaches the hub.
        eventually(lambda: site["ID"] in [e["ID"] for e in httpx.get(
            f"{hub.url}/v1/event/list", params={"dc": "plant-1"}, headers=admin, timeout=10).json()],
            what="the site's event at the hub")
        assert httpx.get(f"{hub.url}/v1/event/list", params={"name": "rollout"}, headers=admin).json() == []
    finally:
        edge.stop()
        hub.stop()

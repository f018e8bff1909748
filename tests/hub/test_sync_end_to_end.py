"""A hub and two edges as real processes: partitions heal and the later write wins."""

from __future__ import annotations

import signal

import httpx
from agents import EdgeProcess, HubProcess, eventually, free_port



def raw(url: str, key: str, dc: str | None = None) -> bytes | None:
    params = {"raw": ""} | ({"dc": dc} if dc else {})
    response = httpx.get(f"{url}/v1/kv/{key}", params=params)
    return response.content if response.status_code == 200 else None


def connected_sites(hub: HubProcess) -> set[str]:
    return {s["Site"] for s in httpx.get(f"{hub.url}/v1/sites").json() if s["Connected"]}


def test_edges_write_while_hub_is_down_and_all_agree_after(tmp_path):
    port = free_port()
    hub = HubProcess(tmp_path / "hub", port)
    e1 = EdgeProcess(tmp_path / "e1", site="s1", node="n1", hub_url=hub.url)
    e2 = EdgeProcess(tmp_path / "e2", site="s2", node="n2", hub_url=hub.url)
    try:
        eventually(lambda: connected_sites(hub) == {"s1", "s2"}, what="both edges connected")
        httpx.put(f"{hub.url}/v1/kv/fleet/mode?dc=global", content=b"initial").raise_for_status()
        eventually(lambda: raw(e1.url, "fleet/mode", "global") == b"initial", what="global reaches e1")
        eventually(lambda: raw(e2.url, "fleet/mode", "global") == b"initial", what="global reaches e2")

        hub.stop(signal.SIGKILL)
        eventually(lambda: not httpx.get(f"{e1.url}/v1/sync/status").json()["Peers"][0]["Connected"],
                   what="e1 notices the hub is gone")

        # Both edges keep serving writes offline: the same global key, and their own site keys.
        httpx.put(f"{e1.url}/v1/kv/fleet/mode?dc=global", content=b"from-e1").raise_for_status()
        httpx.put(f"{e1.url}/v1/kv/local/x", content=b"x1").raise_for_status()
        httpx.put(f"{e2.url}/v1/kv/local/y", content=b"y2").raise_for_status()
        httpx.put(f"{e2.url}/v1/kv/fleet/mode?dc=global", content=b"from-e2").raise_for_status()  # later
        assert httpx.get(f"{e1.url}/v1/sync/status").json()["Peers"][0]["PendingChanges"] >= 2

        hub = HubProcess(tmp_path / "hub", port)
        for url in (hub.url, e1.url, e2.url):
            eventually(lambda url=url: raw(url, "fleet/mode", "global") == b"from-e2", what=f"later write wins at {url}")
        eventually(lambda: raw(hub.url, "local/x", "s1") == b"x1", what="s1 key at the hub")
        eventually(lambda: raw(hub.url, "local/y", "s2") == b"y2", what="s2 key at the hub")
        assert raw(e2.url, "local/x") is None  # sites stay apart
        assert raw(e1.url, "local/y") is None

        # The losing write is reported, not silently dropped.
        history = httpx.get(f"{e1.url}/v1/kv/fleet/mode", params={"history": "", "dc": "global"}).json()
        losers = [h for h in history if h["Conflict"]]
        assert [h["Value"] for h in losers] == ["ZnJvbS1lMQ=="]  # base64 of from-e1
        status = eventually(lambda: (s := httpx.get(f"{e1.url}/v1/sync/status").json()["Peers"][0])
                            ["Connected"] and s["PendingChanges"] == 0 and s, what="e1 caught up")
        assert status["Conflicts"] >= 1
        sites = {s["Site"]: s for s in httpx.get(f"{hub.url}/v1/sites").json()}
        assert sites["s1"]["Connected"] and sites["s2"]["Connected"]
        metrics = httpx.get(f"{e1.url}/metrics").text
        assert "konsul_sync_connected{peer=" in metrics
        assert "konsul_sync_sent_bytes_total" in httpx.get(f"{hub.url}/metrics").text
    finally:
        for agent in (e1, e2, hub):
            agent.stop()


def test_hub_answers_for_sites_and_pushes_config_to_them(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    edge = EdgeProcess(tmp_path / "e1", site="plant-7", node="gw", hub_url=hub.url)
    try:
        eventually(lambda: connected_sites(hub) == {"plant-7"}, what="edge connected")
        # A write at the hub into the site's scope reaches the site.
        httpx.put(f"{hub.url}/v1/kv/line/speed?dc=plant-7", content=b"42").raise_for_status()
        eventually(lambda: raw(edge.url, "line/speed") == b"42", what="hub write reaches the site")
        # Services registered at the edge, with their check status, are visible at the hub.
        httpx.put(f"{edge.url}/v1/agent/service/register",
                  json={"Name": "plc", "Port": 502, "Check": {"TTL": "60s"}}).raise_for_status()
        httpx.put(f"{edge.url}/v1/agent/check/pass/service:plc").raise_for_status()

        def plc_passing_at_hub():
            nodes = httpx.get(f"{hub.url}/v1/health/service/plc", params={"dc": "plant-7", "passing": ""}).json()
            return [n["Service"]["Port"] for n in nodes] == [502]

        eventually(plc_passing_at_hub, what="service and its passing check at the hub")
        body = httpx.get(f"{hub.url}/v1/kv/x", params={"dc": "nowhere"})
        assert body.status_code == 404 and body.json()["error"] == "not_found"
        at_edge = httpx.get(f"{edge.url}/v1/kv/x", params={"dc": "other-site"})
        assert at_edge.status_code == 404 and hub.url in at_edge.json()["detail"]
    finally:
        edge.stop()
        hub.stop()


def test_a_backlog_larger_than_a_megabyte_syncs_both_ways(tmp_path):
    """A reconciliation diff travels as one frame: no 1 MiB message limit may cut it."""
    port = free_port()
    hub = HubProcess(tmp_path / "hub", port)
    edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=hub.url)
    try:
        eventually(lambda: connected_sites(hub) == {"s1"}, what="edge connected")
        # Edge -> hub: written while the hub is down.
        hub.stop(signal.SIGKILL)
        up = {f"up/{i}": bytes([65 + i]) * 400_000 for i in range(4)}  # 1.6 MB
        for key, value in up.items():
            httpx.put(f"{edge.url}/v1/kv/{key}", content=value, timeout=30).raise_for_status()
        hub = HubProcess(tmp_path / "hub", port)
        for key, value in up.items():
            eventually(lambda key=key, value=value: raw(hub.url, key, "s1") == value, what=f"{key} at the hub")
        # Hub -> edge: written at the hub for the site while the edge is down.
        edge.stop()
        down = {f"down/{i}": bytes([97 + i]) * 400_000 for i in range(4)}
        for key, value in down.items():
            httpx.put(f"{hub.url}/v1/kv/{key}?dc=s1", content=value, timeout=30).raise_for_status()
        edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=hub.url)
        for key, value in down.items():
            eventually(lambda key=key, value=value: raw(edge.url, key) == value, what=f"{key} at the edge")
        eventually(
            lambda: httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"][0]["PendingChanges"] == 0,
            what="the edge sees its writes confirmed after a restart",
        )
    finally:
        edge.stop()
        hub.stop()

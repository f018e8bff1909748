"""A conflict loser that reaches the hub after its winner advances the index: a blocking
``?history`` query is woken by its arrival (ACLs off: this is about sync)."""

from __future__ import annotations

import signal

import httpx
from agents import EdgeProcess, HubProcess, eventually, free_port

KEY = "fleet/mode"


def connected(edge: EdgeProcess) -> bool:
    peers = httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"]
    return bool(peers) and peers[0]["Connected"] and peers[0]["PendingChanges"] == 0


def history(hub: HubProcess, **params) -> httpx.Response:
    response = httpx.get(f"{hub.url}/v1/kv/{KEY}", params={"history": "", "dc": "global", **params}, timeout=30)
    response.raise_for_status()
    return response


def test_a_loser_arriving_after_its_winner_wakes_a_blocking_history_query(tmp_path):
    port = free_port()
    hub = HubProcess(tmp_path / "hub", port)
    e1 = EdgeProcess(tmp_path / "e1", site="s1", node="n1", hub_url=hub.url)
    e2 = EdgeProcess(tmp_path / "e2", site="s2", node="n2", hub_url=hub.url)
    try:
        eventually(lambda: connected(e1) and connected(e2), what="both edges connected")
        hub.stop(signal.SIGKILL)
        eventually(lambda: not connected(e1) and not connected(e2), what="both edges notice the hub is gone")
        # Two partitioned writers; e1's write is the earlier, so it loses.
        httpx.put(f"{e1.url}/v1/kv/{KEY}?dc=global", content=b"from-e1").raise_for_status()
        httpx.put(f"{e2.url}/v1/kv/{KEY}?dc=global", content=b"from-e2").raise_for_status()
        e1.stop()
        hub = HubProcess(tmp_path / "hub", port)
        eventually(lambda: httpx.get(f"{hub.url}/v1/kv/{KEY}", params={"raw": "", "dc": "global"}).content
                   == b"from-e2", what="the winner at the hub")
        before = history(hub)
        assert not any(h["Conflict"] for h in before.json())
        index = before.headers["X-Consul-Index"]

        # The loser comes later; the hub's shown value does not change, its history does.
        e1 = EdgeProcess(tmp_path / "e1", site="s1", node="n1", hub_url=hub.url)
        woken = history(hub, index=index, wait="10s")
        assert int(woken.headers["X-Consul-Index"]) > int(index)
        losers = [h for h in woken.json() if h["Conflict"]]
        assert len(losers) == 1
        winner = httpx.get(f"{hub.url}/v1/kv/{KEY}", params={"raw": "", "dc": "global"})
        assert winner.content == b"from-e2"
    finally:
        for agent in (e1, e2, hub):
            agent.stop()

"""At the hub, a site's health answers change with the check status its edge reports: a
blocking ``/v1/health/service`` query there is woken by a check passing at the edge
(Consul's health endpoints move their index with check status; ACLs off: this is about sync)."""

from __future__ import annotations

import httpx
from agents import EdgeProcess, HubProcess, eventually, free_port


def statuses(answer: httpx.Response) -> list[str]:
    return [c["Status"] for entry in answer.json() for c in entry["Checks"] if c["ServiceName"] == "plc"]


def test_a_check_passing_at_the_edge_wakes_a_blocking_health_query_at_the_hub(tmp_path):
    hub = HubProcess(tmp_path / "hub", free_port())
    edge = EdgeProcess(tmp_path / "edge", site="s1", node="n1", hub_url=hub.url)
    try:
        httpx.put(f"{edge.url}/v1/agent/service/register",
                  json={"Name": "plc", "ID": "plc-1", "Port": 502, "Check": {"TTL": "60s"}}).raise_for_status()
        health = f"{hub.url}/v1/health/service/plc"
        eventually(lambda: statuses(httpx.get(health, params={"dc": "s1"})) == ["critical"],
                   what="the instance at the hub, its TTL check not yet passed")
        index = httpx.get(health, params={"dc": "s1"}).headers["X-Consul-Index"]

        httpx.put(f"{edge.url}/v1/agent/check/pass/service:plc-1", params={"note": "running"}).raise_for_status()
        woken = httpx.get(health, params={"dc": "s1", "index": index, "wait": "20s"}, timeout=30)
        assert int(woken.headers["X-Consul-Index"]) > int(index)
        assert statuses(woken) == ["passing"]
    finally:
        for agent in (edge, hub):
            agent.stop()

"""The console shows a write conflict made by two partitioned writers, with both values,
and an edge serves its own console for its site (ACLs off: these are about sync)."""

from __future__ import annotations

import signal

import httpx
from agents import EdgeProcess, HubProcess, eventually, free_port
from screenshots import screenshot


def raw(url: str, key: str, dc: str | None = None) -> bytes | None:
    response = httpx.get(f"{url}/v1/kv/{key}", params={"raw": ""} | ({"dc": dc} if dc else {}))
    return response.content if response.status_code == 200 else None


def connected(edge: EdgeProcess) -> bool:
    peers = httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"]
    return bool(peers) and peers[0]["Connected"] and peers[0]["PendingChanges"] == 0


def test_a_conflict_between_partitioned_writers_is_shown_with_both_values(tmp_path, page):
    port = free_port()
    hub = HubProcess(tmp_path / "hub", port)
    e1 = EdgeProcess(tmp_path / "e1", site="s1", node="n1", hub_url=hub.url)
    e2 = EdgeProcess(tmp_path / "e2", site="s2", node="n2", hub_url=hub.url)
    try:
        eventually(lambda: connected(e1) and connected(e2), what="both edges connected")
        hub.stop(signal.SIGKILL)
        eventually(lambda: not connected(e1) and not connected(e2), what="both edges notice the hub is gone")
        # Two writers of one fleet-wide key, neither seeing the other.
        httpx.put(f"{e1.url}/v1/kv/fleet/mode?dc=global", content=b"from-e1").raise_for_status()
        httpx.put(f"{e2.url}/v1/kv/fleet/mode?dc=global", content=b"from-e2").raise_for_status()
        e1.stop()  # its losing write reaches the hub only after the page is open
        hub = HubProcess(tmp_path / "hub", port)
        eventually(lambda: raw(hub.url, "fleet/mode", "global") == b"from-e2", what="the later write wins at the hub")

        page.goto(f"{hub.url}/ui/#/kv/global?prefix=fleet/&key=fleet/mode")
        history = page.get_by_role("list", name="History timeline")
        history.locator("li[data-conflict=false] pre.value").filter(has_text="from-e2").wait_for()
        assert history.locator("li[data-conflict=true]").count() == 0
        # The loser arrives while the timeline is open: it shows without a reload.
        e1 = EdgeProcess(tmp_path / "e1", site="s1", node="n1", hub_url=hub.url)
        loser = history.locator("li[data-conflict=true]")
        loser.get_by_text("conflict loser").wait_for()
        assert loser.locator("pre.value").inner_text() == "from-e1"
        assert history.locator("li[data-conflict=false] pre.value").first.inner_text() == "from-e2"
        page.get_by_text("conflicting write(s)").wait_for()
        page.get_by_label("Value").wait_for()
        screenshot(page, "kv-conflict")

        # Each edge serves the console for its own site: its link to the hub, live.
        eventually(lambda: connected(e1), what="e1 back with the hub")
        page.goto(f"{e1.url}/ui/")
        page.get_by_role("heading", name="Site s1").wait_for()
        page.get_by_role("table", name="Sync peers").get_by_text("connected", exact=True).wait_for()
        page.set_viewport_size({"width": 390, "height": 800})  # a phone, in dark mode
        page.emulate_media(color_scheme="dark")
        assert page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
        screenshot(page, "edge-site-phone")
    finally:
        for agent in (e1, e2, hub):
            agent.stop()

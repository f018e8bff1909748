"""The fleet page shows each site's telemetry buffer, buffered and dropped, as its edge reports it
to the hub over the sync session (ephemeral status, never in the CRDT). ACLs off: this is about sync."""

from __future__ import annotations

import httpx
from agents import EdgeProcess, HubProcess, eventually, free_port

DEVICE = "meter-1"
SAMPLES = 1_000  # well past a 16 KiB buffer: the oldest are dropped while the hub is away


def site_telemetry(hub: HubProcess) -> dict | None:
    sites = {s["Site"]: s for s in httpx.get(f"{hub.url}/v1/sites").json()}
    return sites["s1"]["Telemetry"] if "s1" in sites else None


def edge_telemetry(edge: EdgeProcess) -> dict:
    return httpx.get(f"{edge.url}/v1/sync/status").json()["Telemetry"]


def test_the_fleet_page_shows_each_sites_telemetry_buffered_and_dropped(tmp_path, page):
    hub_port = free_port()
    edge = EdgeProcess(tmp_path / "edge", hub_url=f"http://127.0.0.1:{hub_port}", extra=["--telemetry-buffer", "16KiB"])
    hub = None
    try:
        httpx.put(f"{edge.url}/v1/devices/{DEVICE}", json={"Type": "meter"}).raise_for_status()
        for start in range(0, SAMPLES, 250):
            samples = [{"seq": n, "kwh": n} for n in range(start, start + 250)]
            httpx.post(f"{edge.url}/v1/devices/{DEVICE}/telemetry", json=samples).raise_for_status()
        dropped = edge_telemetry(edge)["Dropped"]
        assert dropped > 0

        # The hub comes; the edge reports its counters, and the buffer drains.
        hub = HubProcess(tmp_path / "hub", hub_port)
        eventually(lambda: edge_telemetry(edge)["Buffered"] == 0, what="the edge's buffer drained")
        eventually(lambda: (site_telemetry(hub) or {}).get("Buffered") == 0, what="the hub told the buffer drained")
        status = site_telemetry(hub)
        assert status["Dropped"] == dropped and status["Forwarded"] == SAMPLES - dropped

        page.goto(f"{hub.url}/ui/")
        cell = page.locator("tr[data-site=s1] td.telemetry")
        cell.filter(has_text=f"0 / {dropped}").wait_for()
        assert cell.locator("span.warn").inner_text() == str(dropped)
        page.get_by_role("link", name="s1").click()
        page.locator("dd.telemetry").filter(has_text=f"0 / {dropped}").wait_for()
    finally:
        edge.stop()
        if hub is not None:
            hub.stop()

"""A value no reader can decode, stored at the hub, reaches an edge: both keep running.

Found as an attacker would: a desired state nested 900 levels deep was stored
(the CBOR reader stops at 400), and then the agent that held it exited on
every start, and every edge that synced it died, even from an empty data
directory. The HTTP API now refuses such a document; this test stores one the
way an older or hostile peer would (bypassing the checks), then runs a real
hub and a real edge on it.
"""

from __future__ import annotations

import httpx
import trio
from agents import EdgeProcess, HubProcess, eventually

import konsul.sync.scope
from konsul.sync.devices import DeviceRecord
from konsul.sync.replica import Replica


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


async def store_poisoned_hub(data_dir, monkeypatch) -> None:
    """A hub data directory whose site ``plant`` holds a 900-level desired field."""
    monkeypatch.setattr(konsul.sync.scope, "check_document", lambda document, side: document)
    replica = Replica.open(data_dir, per_scope_stores=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = await replica.open_scope("plant")
            await scope.put_device(DeviceRecord("pump-1", type="pump"))
            await scope.write_twin("desired", "pump-1", {"mode": "eco", "poison": nested(900)})
            nursery.cancel_scope.cancel()
    finally:
        replica.close()
    monkeypatch.undo()


def desired(url: str, dc: str | None = None) -> dict:
    response = httpx.get(f"{url}/v1/devices/pump-1/desired", params={"dc": dc} if dc else {})
    response.raise_for_status()
    return response.json()


def quarantined(url: str) -> dict:
    return httpx.get(f"{url}/v1/sync/status").json().get("Quarantined", {})


async def test_an_unreadable_stored_value_neither_stops_the_hub_nor_the_edges_that_sync_it(tmp_path, monkeypatch):
    await store_poisoned_hub(tmp_path / "hub", monkeypatch)

    hub = HubProcess(tmp_path / "hub", extra=["--acl", "off"])
    edge = None
    try:
        # The hub starts on it, serves the rest of the document, and reports the value.
        assert desired(hub.url, dc="plant") == {"mode": "eco"}
        assert quarantined(hub.url)["plant"]["Count"] == 1

        # An edge syncing that site from an empty data dir refuses the update that holds the
        # value (sync/update_check.py) and stays up; so does its restart.
        edge = EdgeProcess(tmp_path / "edge", site="plant", hub_url=hub.url, extra=["--acl", "off"])
        eventually(lambda: httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"], what="the edge to try the hub")
        edge.stop()
        edge = EdgeProcess(tmp_path / "edge", site="plant", hub_url=hub.url, extra=["--acl", "off"])
        assert httpx.put(f"{edge.url}/v1/kv/still/writable", content=b"yes").json() is True

        # A document like the poisoned one is refused at the door, at the hub and at the edge.
        for url, params in ((hub.url, {"dc": "plant"}), (edge.url, {})):
            response = httpx.patch(f"{url}/v1/devices/pump-1/desired", json={"again": nested(900)}, params=params)
            assert response.status_code in (400, 404), response.text
        assert desired(hub.url, dc="plant") == {"mode": "eco"}
    finally:
        if edge is not None:
            edge.stop()
        hub.stop()

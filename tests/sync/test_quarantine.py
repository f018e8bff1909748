"""Stored values no reader can decode: the scope loads, the value reads as absent and is reported.

The values come the way a hostile or older peer would send them: as a sync
update whose versions hold payloads no writer here makes (nested past the
CBOR reader's limit, not CBOR at all, CBOR of the wrong shape). Before
quarantine.py, such a value made every read of it fail, and a desired state
nested 900 levels made the edge exit on every start. Scope.apply_remote now
refuses such updates (sync/update_check.py); these tests turn that check off
to store them as an agent did before it.
"""

from __future__ import annotations

import cbor2
import pytest
from sync_support import running, trio_wall_ms

import konsul.sync.scope
from konsul.sync.devices import DeviceRecord
from konsul.sync.hlc import HybridClock
from konsul.sync.replica import Replica
from konsul.sync.versioned import VersionedMap
from pycrdt import Doc

DEEP = b"\x81" * 900 + b"\x80"  # a CBOR array nested 900 levels: cbor2 stops at 400


@pytest.fixture(autouse=True)
def unchecked_remote_updates(monkeypatch):
    """Remote updates merged unchecked, as before sync/update_check.py: how the stored values got in."""

    async def accept(update: bytes, collection: str) -> None:
        pass

    monkeypatch.setattr(konsul.sync.scope, "check_update_soon", accept)


def poisoned_update(key: str, payload: bytes) -> bytes:
    """An update from another replica carrying one version of ``key`` with ``payload`` as it is."""
    versions = VersionedMap(Doc(), lambda update: None)
    versions.write(key, HybridClock("0000000000ff").now(), payload)
    return versions.doc.get_update()


CASES = {
    "kv value nested too deep": ("kv", "config/a", b"\x83" + b"\x81" * 900 + b"\x80"),
    "kv value not CBOR": ("kv", "config/a", b"\x83\xff\xff"),
    "kv value of the wrong shape": ("kv", "config/a", cbor2.dumps(["text, not bytes", 0, None])),
    "kv value with an int for bytes": ("kv", "config/a", cbor2.dumps([1, 0, None])),
    "kv value with negative flags": ("kv", "config/a", cbor2.dumps([b"v", -1, None])),
    "service entry not CBOR": ("catalog", "node-1/web", b"\xff"),
    "service entry of the wrong shape": ("catalog", "node-1/web", cbor2.dumps({"node": 1})),
    "device record nested too deep": ("devices", "d/pump-1", DEEP),
    "device record with a numeric id": (
        "devices", "d/pump-1",
        cbor2.dumps({"id": 7, "type": "", "tags": [], "attributes": {}, "firmware": "", "token_hash": "",
                     "kv_read": [], "kv_write": [], "created": 0}),
    ),
    "twin field nested too deep": ("devices", "desired/pump-1/mode", DEEP),
    "twin field not CBOR": ("devices", "desired/pump-1/mode", b"\xff\x00"),
}


def readable(scope) -> dict:
    """Everything a client can read of the scope; no reader may raise."""
    return {
        "kv": scope.kv.list(""),
        "history": scope.kv.history("config/a"),
        "services": scope.catalog.services(),
        "devices": scope.devices.records(),
        "desired": scope.devices.twin.document("desired", "pump-1"),
        "conflicts": scope.devices.twin.conflicts("pump-1"),
    }


@pytest.mark.parametrize("case", CASES)
async def test_an_unreadable_synced_value_is_quarantined_and_the_scope_still_loads(tmp_path, case):
    collection, key, payload = CASES[case]
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as victim:
        await receive_poisoned(victim, collection, key, payload)

    # The store holds the value as it came; the scope loads again from it.
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as reopened:
        scope = reopened.scope("site")
        seen = readable(scope)
        assert [entry.key for entry in seen["kv"]] == ["config/b"]
        assert [record.device_id for record in seen["devices"]] == ["pump-2"]
        assert seen["desired"] == {}
        assert reopened.quarantined()["site"]["Count"] == 1


async def receive_poisoned(victim, collection: str, key: str, payload: bytes) -> None:
    site = victim.scope("site")
    await site.kv_put("config/b", b"kept")
    await site.put_device(DeviceRecord("pump-2"))

    await site.apply_remote(collection, poisoned_update(key, payload))

    assert readable(site)["kv"][0].key == "config/b"
    assert [record.device_id for record in readable(site)["devices"]] == ["pump-2"]
    assert site.quarantine.count == 1
    (entry,) = victim.quarantined()["site"]["Values"]
    assert (entry["Collection"], entry["Key"]) == (collection, key)


async def test_a_later_write_supersedes_a_quarantined_value(open_replica):
    victim = await open_replica("victim")
    site = victim.scope("site")
    await site.put_device(DeviceRecord("pump-1"))
    await site.apply_remote("devices", poisoned_update("desired/pump-1/mode", DEEP))
    assert site.devices.twin.document("desired", "pump-1") == {}

    assert await site.write_twin("desired", "pump-1", {"mode": "eco"}) == {"mode": "eco"}
    await site.apply_remote("kv", poisoned_update("config/a", b"\x83\xff"))
    await site.kv_put("config/a", b"fixed")
    assert site.kv.get("config/a").value == b"fixed"


async def test_a_deeply_nested_twin_document_is_refused_by_the_state_api(open_replica):
    from konsul.sync.errors import InvalidArgument

    replica = await open_replica()
    site = replica.scope("site")
    await site.put_device(DeviceRecord("pump-1"))
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="nested deeper"):
        await site.write_twin("desired", "pump-1", {"mode": deep})
    with pytest.raises(InvalidArgument, match="JSON has no number"):
        await site.write_twin("desired", "pump-1", {"mode": float("nan")})
    assert site.devices.twin.document("desired", "pump-1") == {}

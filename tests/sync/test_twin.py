"""Device twins: field-level merge of desired state across replicas, and reported state."""

from __future__ import annotations

import pytest
from sync_support import BASE_MS, WallClock, running, send

from konsul.sync.devices import DeviceRecord
from konsul.sync.errors import InvalidArgument, NotFound, ValueTooLarge
from konsul.sync.replica import Replica
from konsul.sync.twin import MAX_TWIN_BYTES


async def two_replicas_with_a_device(open_replica):
    edge = (await open_replica("edge", wall_ms=WallClock(BASE_MS))).scope("site")
    hub = (await open_replica("hub", wall_ms=WallClock(BASE_MS + 1_000))).scope("site")
    await edge.put_device(DeviceRecord("pump-1", type="pump"))
    await send(edge, hub, "devices")
    return edge, hub


async def test_concurrent_changes_to_different_fields_merge(open_replica):
    edge, hub = await two_replicas_with_a_device(open_replica)
    await edge.write_twin("desired", "pump-1", {"interval": 5})
    await hub.write_twin("desired", "pump-1", {"led": True})
    await send(edge, hub, "devices")
    await send(hub, edge, "devices")
    for scope in (edge, hub):
        assert scope.devices.twin.document("desired", "pump-1") == {"interval": 5, "led": True}
        assert scope.devices.twin.conflicts("pump-1") == []


async def test_concurrent_changes_to_one_field_resolve_to_the_later_stamp_and_keep_the_loser(open_replica):
    edge, hub = await two_replicas_with_a_device(open_replica)
    await edge.write_twin("desired", "pump-1", {"interval": 5})  # earlier wall clock
    await hub.write_twin("desired", "pump-1", {"interval": 60})
    await send(edge, hub, "devices")
    await send(hub, edge, "devices")
    for scope in (edge, hub):
        assert scope.devices.twin.document("desired", "pump-1") == {"interval": 60}
        (conflict,) = scope.devices.twin.conflicts("pump-1")
        assert (conflict.side, conflict.field, conflict.value) == ("desired", "interval", 5)
    assert hub.devices.conflicts == 1
    # A later write settles the field: the loser is superseded everywhere.
    await edge.write_twin("desired", "pump-1", {"interval": 30})
    await send(edge, hub, "devices")
    assert hub.devices.twin.conflicts("pump-1") == []
    assert hub.devices.twin.document("desired", "pump-1") == {"interval": 30}


async def test_a_removed_field_does_not_come_back_from_an_older_concurrent_write(open_replica):
    edge, hub = await two_replicas_with_a_device(open_replica)
    await edge.write_twin("desired", "pump-1", {"mode": "eco"})
    await send(edge, hub, "devices")
    await edge.write_twin("desired", "pump-1", {"mode": "boost"})  # earlier stamp than the hub's delete
    await hub.write_twin("desired", "pump-1", {"mode": None})
    await send(edge, hub, "devices")
    await send(hub, edge, "devices")
    assert edge.devices.twin.document("desired", "pump-1") == {}
    assert hub.devices.twin.document("desired", "pump-1") == {}


async def test_replace_merge_and_delta(open_replica):
    (scope,) = [(await open_replica("one")).scope("site")]
    await scope.put_device(DeviceRecord("led-7"))
    assert await scope.write_twin("desired", "led-7", {"led": True, "interval": 5}) == {"interval": 5, "led": True}
    assert await scope.write_twin("desired", "led-7", {"interval": None, "color": "red"}) == {"color": "red", "led": True}
    assert await scope.write_twin("desired", "led-7", {"led": False}, replace=True) == {"led": False}
    await scope.write_twin("reported", "led-7", {"led": 0, "uptime": 12})
    # 0 is not false: the device has not applied the desired value yet.
    assert scope.devices.twin.delta("led-7") == {"led": False}
    await scope.write_twin("reported", "led-7", {"led": False})
    assert scope.devices.twin.delta("led-7") == {}
    # JSON has one kind of number: a device reporting 5.0 for 5 has applied it.
    await scope.write_twin("desired", "led-7", {"interval": 5, "limits": {"max": 2}})
    await scope.write_twin("reported", "led-7", {"interval": 5.0, "limits": {"max": 2.0}})
    assert scope.devices.twin.delta("led-7") == {}


async def test_writing_what_is_there_costs_no_commit(open_replica):
    scope = (await open_replica("one")).scope("site")
    await scope.put_device(DeviceRecord("s-1"))
    await scope.write_twin("reported", "s-1", {"interval": 5, "fw": "1.0"})
    index = scope.index.value
    await scope.write_twin("reported", "s-1", {"fw": "1.0", "interval": 5})
    assert scope.index.value == index


async def test_bad_twin_input_changes_nothing(open_replica):
    scope = (await open_replica("one")).scope("site")
    await scope.put_device(DeviceRecord("s-1"))
    await scope.write_twin("desired", "s-1", {"interval": 5})
    for document, error in [
        ([1, 2], InvalidArgument),
        ({"": 1}, InvalidArgument),
        ({"x" * 300: 1}, InvalidArgument),
        ({"blob": "x" * (MAX_TWIN_BYTES + 1)}, ValueTooLarge),
    ]:
        with pytest.raises(error):
            await scope.write_twin("desired", "s-1", document)
    with pytest.raises(NotFound):
        await scope.write_twin("desired", "nobody", {"interval": 1})
    assert scope.devices.twin.document("desired", "s-1") == {"interval": 5}


async def test_twins_survive_restart_and_go_with_their_device(tmp_path):
    async with running(Replica.open(tmp_path / "r")) as replica:
        scope = replica.scope("site")
        await scope.put_device(DeviceRecord("s-1"))
        await scope.write_twin("desired", "s-1", {"interval": 5})
        await scope.write_twin("reported", "s-1", {"interval": 10})
    async with running(Replica.open(tmp_path / "r")) as replica:
        scope = replica.scope("site")
        assert scope.devices.twin.document("desired", "s-1") == {"interval": 5}
        assert scope.devices.twin.delta("s-1") == {"interval": 5}
        changed = []
        scope.listeners.append(lambda collection, keys: changed.append(keys))
        await scope.delete_device("s-1")
        assert "desired/s-1/interval" in changed[-1]
        assert scope.devices.twin.document("desired", "s-1") == {}
        assert scope.devices.records() == []

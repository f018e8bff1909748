"""The hub's telemetry store keeps its sample count across restarts without counting the table."""

from __future__ import annotations

import sqlite3
from contextlib import asynccontextmanager

import trio
from konsul.hub.telemetry_store import TelemetryStore
from konsul.sync.telemetry import Sample


@asynccontextmanager
async def running(path):
    """A TelemetryStore with its writer running; closed afterwards."""
    store = TelemetryStore(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def samples(device: str, seqs: range) -> list[Sample]:
    return [Sample(device, seq, 1_000 + seq, b"\xa1atx") for seq in seqs]


async def test_the_stored_count_survives_a_restart_and_duplicates_do_not_count(tmp_path):
    path = tmp_path / "telemetry.db"
    async with running(path) as store:
        assert await store.store("s1", samples("d1", range(0, 10)), 5_000) == 10
        assert await store.store("s1", samples("d1", range(5, 15)), 5_000) == 5  # 5..9 again
        assert store.status()["Stored"] == 15
    store = TelemetryStore(path)
    assert store.status()["Stored"] == 15
    store.close()


async def test_a_store_without_the_counter_is_counted_once(tmp_path):
    path = tmp_path / "telemetry.db"
    async with running(path) as store:
        await store.store("s1", samples("d1", range(0, 7)), 5_000)
    with sqlite3.connect(path) as db:  # as a hub from before the counter left it
        db.execute("DELETE FROM counters")
    async with running(path) as store:
        assert store.status()["Stored"] == 7
        await store.store("s1", samples("d2", range(0, 3)), 5_000)
    store = TelemetryStore(path)
    assert store.status()["Stored"] == 10
    store.close()

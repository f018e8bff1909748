"""The edge's telemetry buffer: samples kept on disk until the hub has them.

Samples from MQTT, CoAP and HTTP are appended to ``telemetry.db`` in the data
directory (its own SQLite file, so telemetry never waits behind the replicated
state, nor it behind telemetry), through the one durable SQLite writer
(``konsul.sync.sqlite_writer``): appends that arrive together share one
transaction, and a sample is acknowledged to its device (PUBACK, 2.04, HTTP
200) only once that transaction is durable.

The forwarder (``telemetry_forwarder.py``) reads the oldest samples, sends them
to the hub and deletes exactly the rows the hub acknowledged as stored. The
buffer is bounded in bytes: when a new sample does not fit, the oldest samples
not in flight to the hub are dropped, and counted, durably, in the same
transaction. Nothing is dropped without being counted (``Telemetry.Dropped`` in
``/v1/sync/status`` and ``konsul_telemetry_dropped_total``).

A few recent samples per device also stay in memory after they are forwarded,
so ``GET /v1/devices/<id>/telemetry`` on an edge shows the latest readings
whether or not the hub is reachable.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from konsul.sync.errors import InvalidArgument, KonsulError, StoreError
from konsul.sync.sqlite_writer import SqliteWriter
from konsul.sync.telemetry import (
    Sample,
    SequenceNumbers,
    add_counter,
    make_sample,
    open_database,
    read_counters,
)

log = logging.getLogger("konsul.edge.telemetry")

DEFAULT_LIMIT_BYTES = 64 * 1024 * 1024
ROW_OVERHEAD = 40  # bytes a row costs beyond its device id and data, roughly
RECENT_PER_DEVICE = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL
);
"""


def row_size(sample: Sample) -> int:
    return ROW_OVERHEAD + len(sample.device) + len(sample.data)


T = TypeVar("T")


class TelemetryBuffer:
    """Durable, bounded store-and-forward queue of one edge's telemetry.

    Args:
        path: the SQLite file.
        limit_bytes: the most the buffered samples may take; older ones are dropped past it.
        durability: ``full`` (fsync per commit) or ``relaxed``, as for the state store.
    """

    def __init__(self, path: Path, limit_bytes: int = DEFAULT_LIMIT_BYTES, durability: str = "full") -> None:
        if limit_bytes < 4096:
            raise ValueError("the telemetry buffer needs at least 4096 bytes")
        self.path = path
        self.limit_bytes = limit_bytes
        db = open_database(path, durability, _SCHEMA)
        self.numbers = SequenceNumbers()
        self.count, self.bytes = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM samples").fetchone()
        counters = read_counters(db)
        self.dropped = counters.get("dropped", 0)
        self.forwarded = counters.get("forwarded", 0)
        self.ingested = 0
        self.in_flight_upto = 0  # rows up to this id may be at the hub: never dropped while so
        self.recent: dict[str, deque[Sample]] = {}
        self.listeners: list[Callable[[], None]] = []  # called whenever samples were stored
        # The bytes the table holds as the writer thread's transactions see
        # them, committed or not: the appends of one round make room for each
        # other. (self.bytes is what is durable.)
        self._writer_bytes = self.bytes
        self._writer = SqliteWriter(path, db, durability)
        self._writer.thread_name = "konsul-telemetry"
        self._writer.on_failure = self._recount
        # Reads go through a connection of their own, opened on first use: WAL
        # lets it read while the writer commits, so neither the forwarder nor a
        # scan for the HTTP API holds up acknowledgements to devices.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = trio.Lock()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._writer.close()

    def _recount(self, _error: Exception) -> None:
        """After a failed round (rolled back): what the table holds, from the table."""
        [(self._writer_bytes,)] = self._writer.query("SELECT coalesce(sum(size), 0) FROM samples")

    async def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """``read(conn)`` on the reader connection, in a worker thread."""
        def run() -> T:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                    check_same_thread=False,
                )
            return read(self._reader)

        async with self._read_lock:
            return await trio.to_thread.run_sync(run)

    # -- ingest ------------------------------------------------------------------

    async def ingest(self, items: list[tuple[str, Any]]) -> list[KonsulError | None]:
        """Store samples ``(device, document)``; returns each one's refusal, or None.

        Returns once every accepted sample is durable. Raises
        :class:`StoreError` if the store could not take them: nothing of the
        call is then acknowledged (a device's QoS 1 resend will bring it again).
        """
        now_ms = int(time.time() * 1000)
        results: list[KonsulError | None] = []
        samples = []
        for device, document in items:
            try:
                sample = make_sample(device, document, self.numbers, now_ms)
                if row_size(sample) > self.limit_bytes // 2:
                    raise InvalidArgument(
                        f"a sample of {len(sample.data)} bytes does not fit the telemetry buffer "
                        f"({self.limit_bytes} bytes)"
                    )
            except KonsulError as error:
                results.append(error)
                continue
            samples.append(sample)
            results.append(None)
        if samples:
            try:
                added, freed, dropped = await self._writer.transact(partial(self._append, samples))
            except StoreError as error:
                log.error("telemetry not stored: %s", error)
                raise
            self.bytes += added - freed
            self.count += len(samples) - dropped
            self.dropped += dropped
            self.ingested += len(samples)
            if dropped:
                log.warning("telemetry buffer full: dropped the %d oldest samples", dropped)
            for sample in samples:
                recent = self.recent.get(sample.device)
                if recent is None:
                    recent = self.recent[sample.device] = deque(maxlen=RECENT_PER_DEVICE)
                recent.append(sample)
            for listener in list(self.listeners):
                listener()
        return results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer, which commits what :meth:`ingest` queued together, until cancelled."""
        await self._writer.run(task_status=task_status)

    def _append(self, samples: list[Sample], db: sqlite3.Connection) -> tuple[int, int, int]:
        """On the writer thread, inside its round's transaction: make room, insert.

        Returns (bytes added, bytes freed, rows dropped).
        """
        in_flight_upto = self.in_flight_upto
        rows = [(s.device, s.seq, s.time_ms, s.data, row_size(s)) for s in samples]
        incoming = sum(row[4] for row in rows)
        excess = self._writer_bytes + incoming - self.limit_bytes
        freed = dropped = 0
        if excess > 0:
            # Oldest first; rows that may be at the hub already only when
            # nothing else is left (else the drop count could overstate).
            for query, arg in (("id > ?", in_flight_upto), ("id <= ?", in_flight_upto)):
                victims = []
                for row_id, size in db.execute(f"SELECT id, size FROM samples WHERE {query} ORDER BY id", (arg,)):
                    if freed >= excess:
                        break
                    victims.append((row_id,))
                    freed += size
                db.executemany("DELETE FROM samples WHERE id = ?", victims)
                dropped += len(victims)
                if freed >= excess:
                    break
            add_counter(db, "dropped", dropped)
        db.executemany(
            "INSERT INTO samples (device, seq, time_ms, data, size) VALUES (?, ?, ?, ?, ?)", rows
        )
        self._writer_bytes += incoming - freed
        return incoming, freed, dropped

    # -- forwarding ----------------------------------------------------------------

    async def oldest(self, after_id: int, limit: int) -> list[tuple[int, Sample]]:
        """Up to ``limit`` buffered samples with ids above ``after_id``, oldest first."""
        def read(db: sqlite3.Connection) -> list[tuple[int, Sample]]:
            rows = db.execute(
                "SELECT id, device, seq, time_ms, data FROM samples WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            return [(row[0], Sample(row[1], row[2], row[3], row[4])) for row in rows]

        return await self._read(read)

    async def acknowledged(self, first_id: int, last_id: int) -> int:
        """The hub stored rows ``first_id..last_id``: delete them; returns how many were here."""
        def delete(db: sqlite3.Connection) -> tuple[int, int]:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM samples WHERE id BETWEEN ? AND ?",
                (first_id, last_id),
            ).fetchone()
            db.execute("DELETE FROM samples WHERE id BETWEEN ? AND ?", (first_id, last_id))
            add_counter(db, "forwarded", count)
            self._writer_bytes -= size
            return count, size

        count, size = await self._writer.transact(delete)
        self.count -= count
        self.bytes -= size
        self.forwarded += count
        return count

    # -- reading ------------------------------------------------------------------

    async def samples(self, device: str, since_ms: int | None, until_ms: int | None, limit: int) -> list[Sample]:
        """A device's newest samples in [since, until), oldest first: buffered and recent."""
        def read(db: sqlite3.Connection) -> list[Sample]:
            rows = db.execute(
                "SELECT device, seq, time_ms, data FROM samples WHERE device = ? "
                "AND time_ms >= ? AND time_ms < ? ORDER BY time_ms DESC, id DESC LIMIT ?",
                (device, since_ms or 0, until_ms or 2**62, limit),
            ).fetchall()
            return [Sample(*row) for row in rows]

        found = {s.seq: s for s in await self._read(read)}
        for sample in self.recent.get(device, ()):
            if (since_ms is None or sample.time_ms >= since_ms) and (until_ms is None or sample.time_ms < until_ms):
                found.setdefault(sample.seq, sample)
        newest = sorted(found.values(), key=lambda s: (s.time_ms, s.seq))[-limit:] if limit else []
        return newest

    def status(self) -> dict[str, int]:
        return {
            "Buffered": self.count,
            "BufferedBytes": self.bytes,
            "LimitBytes": self.limit_bytes,
            "Dropped": self.dropped,
            "Forwarded": self.forwarded,
            "Ingested": self.ingested,
        }

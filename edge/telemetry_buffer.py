"""The edge's telemetry buffer: samples kept on disk until the hub has them.

Samples from MQTT, CoAP and HTTP are appended to ``telemetry.db`` in the data
directory (its own SQLite file, so telemetry never waits behind the replicated
state, nor it behind telemetry). Appends that arrive together share one
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from konsul.sync.errors import InvalidArgument, KonsulError
from konsul.sync.store import store_error
from konsul.sync.tables import immediate
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


@dataclass
class _Round:
    """Samples that commit together, and how their commit ended."""

    done: trio.Event = field(default_factory=trio.Event)
    error: KonsulError | None = None


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
        self._db = open_database(path, durability, _SCHEMA)
        self.numbers = SequenceNumbers()
        self.count, self.bytes = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM samples").fetchone()
        counters = read_counters(self._db)
        self.dropped = counters.get("dropped", 0)
        self.forwarded = counters.get("forwarded", 0)
        self.ingested = 0
        self.in_flight_upto = 0  # rows up to this id may be at the hub: never dropped while so
        self.recent: dict[str, deque[Sample]] = {}
        self.listeners: list[Callable[[], None]] = []  # called whenever samples were stored
        self._pending: list[Sample] = []
        self._round = _Round()
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one thread at a time on the connection
        # Reads for the HTTP API go through a connection of their own, opened
        # on first use: WAL lets it read while ingest commits, so a scan of a
        # large buffer never holds up acknowledgements to devices.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = trio.Lock()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._db.close()

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
            self._pending.extend(samples)
            round_ = self._round
            self._wake.set()
            await round_.done.wait()
            if round_.error is not None:
                raise round_.error
        return results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit what :meth:`ingest` queued, one transaction per round, until cancelled."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._pending:
                samples, self._pending = self._pending, []
                round_, self._round = self._round, _Round()
                try:
                    async with self._lock:
                        added, freed, dropped = await trio.to_thread.run_sync(
                            self._append, samples, self.bytes, self.in_flight_upto
                        )
                except sqlite3.Error as error:
                    round_.error = store_error(error, self.path)
                    log.error("telemetry not stored: %s", round_.error)
                else:
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
                round_.done.set()

    def _append(self, samples: list[Sample], stored_bytes: int, in_flight_upto: int) -> tuple[int, int, int]:
        """In the worker thread: make room, insert; returns (bytes added, bytes freed, rows dropped)."""
        db = self._db
        rows = [(s.device, s.seq, s.time_ms, s.data, row_size(s)) for s in samples]
        incoming = sum(row[4] for row in rows)
        excess = stored_bytes + incoming - self.limit_bytes
        freed = dropped = 0
        with immediate(db):
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
        return incoming, freed, dropped

    # -- forwarding ----------------------------------------------------------------

    async def oldest(self, after_id: int, limit: int) -> list[tuple[int, Sample]]:
        """Up to ``limit`` buffered samples with ids above ``after_id``, oldest first."""
        def read() -> list[tuple[int, Sample]]:
            rows = self._db.execute(
                "SELECT id, device, seq, time_ms, data FROM samples WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            return [(row[0], Sample(row[1], row[2], row[3], row[4])) for row in rows]

        async with self._lock:
            return await trio.to_thread.run_sync(read)

    async def acknowledged(self, first_id: int, last_id: int) -> int:
        """The hub stored rows ``first_id..last_id``: delete them; returns how many were here."""
        def delete() -> tuple[int, int]:
            db = self._db
            with immediate(db):
                count, size = db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM samples WHERE id BETWEEN ? AND ?",
                    (first_id, last_id),
                ).fetchone()
                db.execute("DELETE FROM samples WHERE id BETWEEN ? AND ?", (first_id, last_id))
                add_counter(db, "forwarded", count)
            return count, size

        async with self._lock:
            try:
                count, size = await trio.to_thread.run_sync(delete)
            except sqlite3.Error as error:
                raise store_error(error, self.path) from error
        self.count -= count
        self.bytes -= size
        self.forwarded += count
        return count

    # -- reading ------------------------------------------------------------------

    async def samples(self, device: str, since_ms: int | None, until_ms: int | None, limit: int) -> list[Sample]:
        """A device's newest samples in [since, until), oldest first: buffered and recent."""
        def read() -> list[Sample]:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                    check_same_thread=False,
                )
            rows = self._reader.execute(
                "SELECT device, seq, time_ms, data FROM samples WHERE device = ? "
                "AND time_ms >= ? AND time_ms < ? ORDER BY time_ms DESC, id DESC LIMIT ?",
                (device, since_ms or 0, until_ms or 2**62, limit),
            ).fetchall()
            return [Sample(*row) for row in rows]

        async with self._read_lock:
            found = {s.seq: s for s in await trio.to_thread.run_sync(read)}
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

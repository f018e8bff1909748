"""The hub's telemetry: every site's samples, each kept once.

Edges forward batches over the sync connection; each batch is stored in one
transaction and acknowledged once durable. The primary key is (site, device,
seq), and a sample already there is skipped, so an edge that sends a batch
again (after a crash, or a lost acknowledgement) never makes a sample count
twice.

Every forwarded sample is checked before it is stored (``check_sample``: its
data decodes as a document within the shared limits); a sample that fails is
counted (``Refused``, ``konsul_telemetry_refused_total``) and left out, and
the batch is still acknowledged, so that the edge deletes it instead of
sending the same junk forever.

Ownership (docs/security.md). A session stores samples under its own site
only (the site its credential binds it to), and only for devices of that
site: a sample for a device the site's registry at the hub has deleted, or
whose sequence number runs far ahead of what the hub has seen of the device
(``seq_too_far_ahead``), is refused and counted. A batch naming a device the
hub has not heard of yet is answered "not stored" and comes again: the
device's record may still be on its way over the same connection.

Telemetry lives in ``telemetry.db`` in the hub's data directory, apart from the
replicated state, written by the one durable SQLite writer
(``konsul.sync.sqlite_writer``): batches from several edges that arrive
together share a transaction. It is kept without limit for now; retention is an operator
decision still to be made (docs/operations.md).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from konsul.sync.errors import InvalidArgument, StoreError
from konsul.sync.log_limits import peer_log
from konsul.sync.sqlite_writer import SqliteWriter
from konsul.sync.tables import immediate
from konsul.sync.link import SyncLink
from konsul.sync.replica import Replica
from konsul.sync.telemetry import (
    ACK_KIND,
    BATCH_KIND,
    Sample,
    add_counter,
    open_database,
    parse_batch,
    read_counters,
)

log = logging.getLogger("konsul.hub.telemetry")

T = TypeVar("T")

# How far a device's own sequence numbers may run ahead of the highest the
# hub has stored for it: a device counting one sample a second would take
# 136 years to get there, a forger who wants to claim the numbers a real
# device will use next is stopped.
MAX_SEQ_AHEAD = 2**32
# Numbers the edge gives (microseconds since 1970, sync/telemetry.py) are at
# least this (2001-09-09); they may run ahead of the hub's clock by at most
# the accepted clock skew.
TIME_SEQ_FLOOR = 10**15

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (site, device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (site, device, time_ms);
"""


class TelemetryStore:
    """Durable, deduplicated telemetry of every site.

    Start :meth:`run` in a nursery before :meth:`store`; :meth:`close` once it has stopped.
    """

    def __init__(self, path: Path, durability: str = "full") -> None:
        self.path = path
        db = open_database(path, durability, _SCHEMA)
        self.count = _stored_count(db)
        self._writer = SqliteWriter(path, db, durability)
        self._writer.thread_name = "konsul-telemetry"
        # Reads (the HTTP API, the ownership checks) on a connection of their
        # own: WAL lets them run while the writer commits.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = trio.Lock()
        self.duplicates = 0
        self.refused = 0  # forwarded samples that failed check_sample, since start
        # Samples refused since start by reason (konsul_telemetry_refused_total).
        self.refused_by_reason: dict[str, int] = {}
        self._highest: dict[tuple[str, str], int | None] = {}  # (site, device) -> highest counter seq stored

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer until cancelled."""
        await self._writer.run(task_status=task_status)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._writer.close()

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

    async def store(self, site: str, samples: list[Sample], received_ms: int) -> int:
        """Store a batch durably; returns how many samples were new."""
        def insert(db: sqlite3.Connection) -> int:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO samples (site, device, seq, time_ms, received_ms, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(site, s.device, s.seq, s.time_ms, received_ms, s.data) for s in samples],
            )
            new = db.total_changes - before
            add_counter(db, "stored", new)
            return new

        new = await self._writer.transact(insert)
        self.count += new
        self.duplicates += len(samples) - new
        for sample in samples:
            key = (site, sample.device)
            if sample.seq < TIME_SEQ_FLOOR and key in self._highest:
                known = self._highest[key]
                self._highest[key] = sample.seq if known is None else max(known, sample.seq)
        return new

    def count_refused(self, reason: str, n: int) -> None:
        self.refused += n
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + n

    async def too_far_ahead(self, site: str, samples: list[Sample], now_ms: int, max_skew_ms: int) -> set[int]:
        """Indexes of ``samples`` whose sequence number runs too far ahead (see ``MAX_SEQ_AHEAD``)."""
        ceiling_time = (now_ms + max_skew_ms) * 1000
        far = set()
        for index, sample in enumerate(samples):
            if sample.seq >= TIME_SEQ_FLOOR:
                if sample.seq > ceiling_time:
                    far.add(index)
                continue
            highest = await self._highest_counter(site, sample.device)
            if highest is not None and sample.seq > highest + MAX_SEQ_AHEAD:
                far.add(index)
        return far

    async def _highest_counter(self, site: str, device: str) -> int | None:
        key = (site, device)
        if key not in self._highest:
            def read(db: sqlite3.Connection) -> int | None:
                (found,) = db.execute(
                    "SELECT max(seq) FROM samples WHERE site = ? AND device = ? AND seq < ?",
                    (site, device, TIME_SEQ_FLOOR),
                ).fetchone()
                return found

            self._highest[key] = await self._read(read)
        return self._highest[key]

    async def samples(
        self, devices: list[tuple[str, str]], since_ms: int | None, until_ms: int | None, limit: int
    ) -> list[tuple[str, Sample]]:
        """The newest ``limit`` samples of ``devices`` ((site, device) pairs) in [since, until), oldest first."""
        def read(db: sqlite3.Connection) -> list[tuple[str, Sample]]:
            found: list[tuple[str, Sample]] = []
            for site, device in devices:
                rows = db.execute(
                    "SELECT device, seq, time_ms, data FROM samples WHERE site = ? AND device = ? "
                    "AND time_ms >= ? AND time_ms < ? ORDER BY time_ms DESC, seq DESC LIMIT ?",
                    (site, device, since_ms or 0, until_ms or 2**62, limit),
                ).fetchall()
                found.extend((site, Sample(*row)) for row in rows)
            found.sort(key=lambda pair: (pair[1].time_ms, pair[0], pair[1].device, pair[1].seq))
            return found[-limit:] if limit else []

        return await self._read(read)

    async def ingest(self, site: str, items: list[tuple[str, Any]]) -> None:
        raise InvalidArgument(
            "telemetry is ingested at the device's edge (POST there); the hub stores what edges forward"
        )

    def status(self) -> dict[str, Any]:
        return {
            "Stored": self.count, "Duplicates": self.duplicates, "Refused": self.refused,
            "RefusedByReason": dict(self.refused_by_reason),
        }


def _stored_count(db: sqlite3.Connection) -> int:
    """Samples stored: a durable counter, so that start-up need not count the table."""
    found = read_counters(db).get("stored")
    if found is not None:
        return found
    with immediate(db):  # a store from before the counter: count it once, at start-up
        (count,) = db.execute("SELECT count(*) FROM samples").fetchone()
        db.execute("INSERT INTO counters (name, value) VALUES ('stored', ?)", (count,))
    return count


class TelemetryIntake:
    """One edge connection's telemetry batches, stored in order and acknowledged.

    Batches queue here from the link's ephemeral messages (which must not
    block) and are stored one at a time; the edge keeps only a few in flight,
    so the queue stays short, and one that grows past ``MAX_QUEUED`` means a
    misbehaving peer, whose batches are then dropped unacknowledged (it sends
    them again).
    """

    MAX_QUEUED = 64
    # What the queued batches' samples may hold together: an edge keeps four
    # batches of at most 4 MiB in flight (edge/telemetry_forwarder.py).
    MAX_QUEUED_BYTES = 64 * 1024 * 1024

    def __init__(
        self, store: TelemetryStore, link: SyncLink, source: str = "", replica: Replica | None = None,
        max_clock_skew_ms: int = 300_000,
    ) -> None:
        self.store = store
        self.link = link
        self.source = source  # the peer's address, for rate-limited log lines
        self.replica = replica  # whose site registries say which devices a site has
        self.max_clock_skew_ms = max_clock_skew_ms
        self._queue: deque[tuple[Any, int]] = deque()
        self._queued_bytes = 0
        self._wake = trio.Event()

    def offer(self, kind: str, data: Any) -> bool:
        """Queue a telemetry batch; returns whether the message was one."""
        if kind != BATCH_KIND:
            return False
        size = _batch_bytes(data)
        if len(self._queue) >= self.MAX_QUEUED or self._queued_bytes + size > self.MAX_QUEUED_BYTES:
            peer_log.log(
                log, logging.WARNING, ("telemetry-queue", self.source),
                "dropping a telemetry batch from %s: %d wait to be stored", self.source, len(self._queue),
            )
        else:
            self._queue.append((data, size))
            self._queued_bytes += size
            self._wake.set()
        return True

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                data, size = self._queue.popleft()
                self._queued_bytes -= size
                site = self.link.peer.site if self.link.peer is not None else None
                try:
                    batch_id, samples, refused = parse_batch(data)
                except InvalidArgument as error:
                    peer_log.log(
                        log, logging.WARNING, ("telemetry-batch", self.source),
                        "ignoring a malformed telemetry batch from %s (%s): %s", site, self.source, error,
                    )
                    continue
                if site is None:
                    continue
                samples, not_yet, refused_here = await self._owned(site, samples)
                if not_yet:
                    # Not stored, not refused: the edge sends the batch again
                    # once the device's record has had time to arrive.
                    self.link.send_ephemeral(site, ACK_KIND, {"b": batch_id, "ok": False, "refused": 0})
                    continue
                if refused:
                    self.store.count_refused("unreadable", refused)
                    peer_log.log(
                        log, logging.WARNING, ("telemetry-sample", self.source),
                        "refused %d telemetry samples from %s (%s): not a document the hub can store",
                        refused, site, self.source,
                    )
                refused += refused_here
                try:
                    if samples:
                        await self.store.store(site, samples, int(time.time() * 1000))
                    ok = True
                except StoreError as error:
                    log.error("telemetry from %s not stored: %s", site, error)
                    ok = False
                # Acknowledged with the refused ones: they would not be stored
                # on any later try, and the edge deletes what is acknowledged.
                self.link.send_ephemeral(site, ACK_KIND, {"b": batch_id, "ok": ok, "refused": refused})


    async def _owned(self, site: str, samples: list[Sample]) -> tuple[list[Sample], bool, int]:
        """The samples ``site`` may store; whether a device is not known yet; how many were refused."""
        if self.replica is None:
            return samples, False, 0
        registry = self.replica.scope(site).devices
        kept, not_yet, deleted = [], "", 0
        for sample in samples:
            if registry.get(sample.device) is not None:
                kept.append(sample)
            elif not registry.ever_registered(sample.device):
                not_yet = sample.device
            else:
                deleted += 1
        if not_yet:
            peer_log.log(
                log, logging.INFO, ("telemetry-unknown", self.source),
                "telemetry from %s (%s) names device %r, which the site has not registered (yet); not stored",
                site, self.source, not_yet,
            )
            return [], True, 0
        far = await self.store.too_far_ahead(site, kept, int(time.time() * 1000), self.max_clock_skew_ms)
        if deleted:
            self.store.count_refused("unknown_device", deleted)
        if far:
            self.store.count_refused("seq_too_far_ahead", len(far))
            kept = [sample for index, sample in enumerate(kept) if index not in far]
        if deleted or far:
            peer_log.log(
                log, logging.WARNING, ("telemetry-owner", self.source),
                "refused telemetry from %s (%s): %d samples of deleted devices, %d with sequence numbers far "
                "ahead of the device's", site, self.source, deleted, len(far),
            )
        return kept, not_yet, deleted + len(far)


def _batch_bytes(data: Any) -> int:
    """The sample bytes a telemetry batch holds (what queueing it costs), roughly."""
    rows = data.get("x") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return 0
    return sum(len(row[3]) for row in rows if isinstance(row, list) and len(row) == 4 and isinstance(row[3], bytes))

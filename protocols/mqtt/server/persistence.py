"""Persistent sessions across restarts: their subscriptions and queued QoS 1/2 messages, in SQLite.

A device with a persistent session that is away when the agent restarts
finds, once it is back, the messages queued for it before the restart, as
MQTT promises for a session that has not expired. Only away sessions are
stored: a connected one lives in memory, and its row goes when it comes back.

One file in the data directory (``mqtt-sessions.db``), written by the agent's
one durable SQLite writer (``sync/sqlite_writer.py`` ``SqliteWriter``: checked
before use, private, WAL, ``synchronous`` FULL or, with ``relaxed``
durability, NORMAL; each flush one transaction on its writer thread). Writes
collect in memory (:meth:`SessionStore.save`, :meth:`~SessionStore.append`,
:meth:`~SessionStore.forget` only note them) and :meth:`~SessionStore.flush`
hands them to the writer, so the broker's delivery path never waits for a
disk. The file is opened at start when it exists (its sessions are loaded),
otherwise only when the first persistent session goes away: an edge whose
devices all use clean sessions never creates it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from konsul.sync.sqlite_writer import SqliteWriter, check_readable, connect_writer

from .sessions import NEVER, OutMessage, Session

log = logging.getLogger("konsul.mqtt")

FILE_NAME = "mqtt-sessions.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, version INTEGER, expiry INTEGER,
                                     away_since REAL, filters TEXT);
CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT, topic TEXT,
                                  payload BLOB, qos INTEGER, retain INTEGER);
CREATE INDEX IF NOT EXISTS queue_client ON queue (client_id, seq);
"""


class SessionStore:
    """Away persistent sessions in ``mqtt-sessions.db``; run the broker inside :meth:`serving`."""

    def __init__(self, data_dir: Path, durability: str = "full") -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.durability = durability
        self._ops: list[tuple] = []
        self._writer: SqliteWriter | None = None
        self._writer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        if self.path.exists():
            self._writer = SqliteWriter(self.path, self._connect(), durability)

    def _connect(self) -> sqlite3.Connection:
        return connect_writer(
            self.path, self.durability, lambda conn: conn.executescript(_SCHEMA),
            check=partial(check_readable, what="MQTT session store",
                          advice="move it away to start without the stored sessions"),
        )

    def load(self, now: float) -> list[Session]:
        """The sessions stored, expired ones dropped; ``now`` is the broker's clock (their ``away_since`` is on it)."""
        now_wall = time.time()
        sessions = []
        if self._writer is None:
            return []
        for client_id, version, expiry, away_since, filters in self._writer.query("SELECT * FROM sessions"):
            if expiry != NEVER and away_since + expiry <= now_wall:
                self._ops.append(("forget", client_id))
                continue
            session = Session(client_id, expiry, version)
            session.filters = {raw: (qos, options, identifier) for raw, qos, options, identifier in json.loads(filters)}
            session.away_since = now - (now_wall - away_since)
            session.persisted = True
            for topic, payload, qos, retain in self._writer.query(
                "SELECT topic, payload, qos, retain FROM queue WHERE client_id = ? ORDER BY seq", client_id
            ):
                session.queue.append(OutMessage(topic, payload, qos, bool(retain)))
            sessions.append(session)
        return sessions

    def save(self, session: Session) -> None:
        """Store ``session`` as it is now (away): its filters, its unacknowledged and queued QoS 1/2 messages."""
        filters = json.dumps([[raw, *values] for raw, values in session.filters.items()])
        # A QoS 2 message the client has PUBREC'd is its already: sending it again would deliver it twice.
        unreceived = [m for packet_id, m in session.inflight.items() if packet_id not in session.released]
        messages = [m for m in (*unreceived, *session.queue) if m.qos]
        self._ops.append(("save", session.client_id, session.version, session.expiry, time.time(), filters, messages))

    def append(self, client_id: str, message: OutMessage) -> None:
        self._ops.append(("append", client_id, message))

    def forget(self, client_id: str) -> None:
        self._ops.append(("forget", client_id))

    @property
    def pending(self) -> bool:
        return bool(self._ops)

    def take(self) -> list[tuple]:
        ops, self._ops = self._ops, []
        return ops

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Keep the writer running while the body (the broker) runs; on the way out, flush what is left.

        The writer is shielded from the cancellation that ends the body, so the
        broker's last changes are written before it stops.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if self._writer is not None:
                    await nursery.start(self._run_writer)
                yield
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await self.flush()
                    except Exception:
                        log.exception("could not save the last MQTT session changes")
                    if self._writer_scope is not None:
                        self._writer_scope.cancel()
                self._nursery = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope(shield=True) as self._writer_scope:
            await self._writer.run(task_status=task_status)  # type: ignore[union-attr]

    async def flush(self) -> None:
        """Write the changes noted so far in one transaction (opening the file for the first one)."""
        ops = self.take()
        if not ops:
            return
        if self._writer is None:
            if self._nursery is None:
                raise RuntimeError("SessionStore.flush() outside serving()")
            self._writer = SqliteWriter(self.path, await trio.to_thread.run_sync(self._connect), self.durability)
            await self._nursery.start(self._run_writer)
        await self._writer.transact(partial(_write, ops))


def _write(ops: list[tuple], conn: sqlite3.Connection) -> None:
    """Write ``ops`` (from :meth:`SessionStore.take`), on the writer thread inside its round's transaction."""
    for op in ops:
        if op[0] == "forget":
            conn.execute("DELETE FROM sessions WHERE client_id = ?", (op[1],))
            conn.execute("DELETE FROM queue WHERE client_id = ?", (op[1],))
        elif op[0] == "save":
            _kind, client_id, version, expiry, away_since, filters, messages = op
            conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
                         (client_id, version, expiry, away_since, filters))
            conn.execute("DELETE FROM queue WHERE client_id = ?", (client_id,))
            conn.executemany("INSERT INTO queue (client_id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                             [(client_id, m.topic, m.payload, m.qos, int(m.retain)) for m in messages])
        else:
            _kind, client_id, message = op
            conn.execute("INSERT INTO queue (client_id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                         (client_id, message.topic, message.payload, message.qos, int(message.retain)))

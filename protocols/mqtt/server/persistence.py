"""Persistent sessions across restarts: their subscriptions and queued QoS 1/2 messages, in SQLite.

A device with a persistent session that is away when the agent restarts
finds, once it is back, the messages queued for it before the restart, as
MQTT promises for a session that has not expired. Only away sessions are
stored: a connected one lives in memory, and its row goes when it comes back.

One file in the data directory (``mqtt-sessions.db``), written with the
store's durability rule (``sync/store.py``): WAL, ``synchronous`` FULL
(``relaxed``: NORMAL), each flush one transaction. Writes collect in memory
(:meth:`SessionStore.save`, :meth:`~SessionStore.append`,
:meth:`~SessionStore.forget` only note them) and :meth:`~SessionStore.flush`
writes them from a worker thread, so the broker's delivery path never waits
for a disk. The class has the small surface of the agent's durable SQLite
writer (open, write a batch in one transaction, close) so it can move onto it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .sessions import NEVER, OutMessage, Session

FILE_NAME = "mqtt-sessions.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, version INTEGER, expiry INTEGER,
                                     away_since REAL, filters TEXT);
CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT, topic TEXT,
                                  payload BLOB, qos INTEGER, retain INTEGER);
CREATE INDEX IF NOT EXISTS queue_client ON queue (client_id, seq);
"""


class SessionStore:
    def __init__(self, data_dir: Path, durability: str = "full") -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(f"PRAGMA synchronous = {'NORMAL' if durability == 'relaxed' else 'FULL'}")
        self._conn.executescript(_SCHEMA)
        self._ops: list[tuple] = []

    def load(self, now: float) -> list[Session]:
        """The sessions stored, expired ones dropped; ``now`` is the broker's clock (their ``away_since`` is on it)."""
        now_wall = time.time()
        sessions = []
        for client_id, version, expiry, away_since, filters in self._conn.execute("SELECT * FROM sessions"):
            if expiry != NEVER and away_since + expiry <= now_wall:
                self._ops.append(("forget", client_id))
                continue
            session = Session(client_id, expiry, version)
            session.filters = {raw: (qos, options, identifier) for raw, qos, options, identifier in json.loads(filters)}
            session.away_since = now - (now_wall - away_since)
            session.persisted = True
            for topic, payload, qos, retain in self._conn.execute(
                "SELECT topic, payload, qos, retain FROM queue WHERE client_id = ? ORDER BY seq", (client_id,)
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

    def write(self, ops: list[tuple]) -> None:
        """Write ``ops`` (from :meth:`take`) in one transaction; run it in a worker thread."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
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
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()

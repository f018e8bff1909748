"""The SQLite store: one owner, WAL, group commit, durable acknowledgements.

Theory of operation
-------------------
Writers never touch SQLite. A writer applies its change in memory, fills a
:class:`WriteBatch` and awaits :meth:`Store.commit`. One committer task takes
every batch queued so far and runs them in one transaction on the store's only
connection, in a worker thread. While that transaction commits (the fsync is
the slow part), new batches queue up and go together in the next round: that
is group commit. Each writer is released only after its round is durable.

If a round fails (disk full, I/O error) every batch of it, and every batch
queued behind it, fails; nothing of them is on disk, and the owner's
``on_failure`` hook reloads the in-memory state from disk so that memory never
shows what the disk does not hold.

The data directory is locked with ``flock`` for the life of the process, and an
existing database is checked read-only before anything writes to it: a corrupt
file is reported by name and never overwritten.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .batch import WriteBatch
from .errors import StoreCorrupt, StoreError, StoreFull, StoreLocked

SCHEMA_VERSION = 1
DB_NAME = "konsul.db"
LOCK_NAME = "LOCK"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS docs(
    scope TEXT, collection TEXT, epoch INTEGER NOT NULL, snapshot BLOB NOT NULL,
    PRIMARY KEY(scope, collection)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS updates(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL, collection TEXT NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS scope_state(
    scope TEXT PRIMARY KEY, idx INTEGER NOT NULL, kv_index INTEGER NOT NULL,
    conflicts INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_index(
    scope TEXT, key TEXT, create_index INTEGER NOT NULL, modify_index INTEGER NOT NULL,
    PRIMARY KEY(scope, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_history(
    scope TEXT, key TEXT, stamp TEXT, op TEXT NOT NULL, flags INTEGER NOT NULL,
    size INTEGER NOT NULL, conflict INTEGER NOT NULL, value BLOB,
    PRIMARY KEY(scope, key, stamp)) WITHOUT ROWID;
"""

DURABILITY_MODES = {"full": "FULL", "relaxed": "NORMAL"}


class _Pending:
    __slots__ = ("batch", "done", "error")

    def __init__(self, batch: WriteBatch) -> None:
        self.batch = batch
        self.done = trio.Event()
        self.error: Exception | None = None


class Store:
    """The durable store of one data directory.

    Open it with :meth:`open`, start :meth:`run` in a nursery, then
    :meth:`commit` batches. ``durability="relaxed"`` commits with
    ``synchronous=NORMAL``: a write survives a crash of the process but the
    last few may be lost on power loss.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self._running = False
        self._closed = False
        self.on_failure: Callable[[Exception], None] | None = None
        self.rounds = 0
        self.batches = 0

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], durability: str = "full") -> Store:
        """Lock ``data_dir``, check its database and open it for writing.

        Raises:
            StoreLocked: another process holds the directory.
            StoreCorrupt: the database file is damaged; it is left untouched.
        """
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability is one of {sorted(DURABILITY_MODES)}")
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_directory(directory)
        path = directory / DB_NAME
        try:
            if path.exists():
                _check_readonly(path)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {DURABILITY_MODES[durability]}")
                conn.execute("PRAGMA journal_size_limit = 4194304")
                conn.execute("PRAGMA busy_timeout = 0")
                conn.executescript(_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
            except sqlite3.Error as error:
                conn.close()
                raise _store_error(error, path) from error
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, conn, lock_fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        os.close(self._lock_fd)

    # -- reading (start-up and maintenance, from the owner's thread) ----------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def meta(self, name: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return default if row is None else row[0]

    def set_meta_now(self, name: str, value: Any) -> None:
        """Write a meta value synchronously; for start-up, before :meth:`run`."""
        self._conn.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, value)
        )

    def size_bytes(self) -> int:
        """Bytes on disk: the database and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
        return total

    # -- writing ---------------------------------------------------------------

    async def commit(self, batch: WriteBatch) -> None:
        """Return once ``batch`` is durable; raise :class:`StoreError` if it is not."""
        if not self._running:
            raise StoreError("the store is not running")
        pending = _Pending(batch)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer loop; cancel it to stop (queued batches then fail)."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                round_, self._queue = self._queue, []
                if round_:
                    await self._commit_round(round_)
        finally:
            self._running = False
            for pending in self._queue:
                pending.error = StoreError("the store shut down before this write was durable")
                pending.done.set()
            self._queue = []

    async def _commit_round(self, round_: list[_Pending]) -> None:
        try:
            # Cancellation must not abandon a transaction half way: shield it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._write, [p.batch for p in round_])
        except StoreError as error:
            failed, self._queue = round_ + self._queue, []
            for pending in failed:
                pending.error = error
                pending.done.set()
            if self.on_failure is not None:
                self.on_failure(error)
            return
        self.rounds += 1
        self.batches += len(round_)
        for pending in round_:
            pending.done.set()

    def _write(self, batches: list[WriteBatch]) -> None:
        merged = WriteBatch()
        for batch in batches:
            merged.merge(batch)
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            _write_rows(conn, merged)
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _store_error(error, self.path) from error

    def checkpoint(self) -> None:
        """Give freed pages back to the file system (after compaction)."""
        self._conn.execute("PRAGMA incremental_vacuum")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _write_rows(conn: sqlite3.Connection, batch: WriteBatch) -> None:
    """Write one merged batch; the caller holds the transaction."""
    if batch.updates:
        conn.executemany(
            "INSERT INTO updates(scope, collection, epoch, data) VALUES (?, ?, ?, ?)",
            batch.updates,
        )
    for (scope, collection), (epoch, snapshot) in batch.snapshots.items():
        conn.execute(
            "INSERT OR REPLACE INTO docs(scope, collection, epoch, snapshot) VALUES (?, ?, ?, ?)",
            (scope, collection, epoch, snapshot),
        )
        # The snapshot holds everything the older epochs' log did.
        conn.execute(
            "DELETE FROM updates WHERE scope = ? AND collection = ? AND epoch < ?",
            (scope, collection, epoch),
        )
    upserts = [(s, k, *v) for (s, k), v in batch.kv_index.items() if v is not None]
    deletes = [key for key, v in batch.kv_index.items() if v is None]
    if upserts:
        conn.executemany(
            "INSERT OR REPLACE INTO kv_index(scope, key, create_index, modify_index) "
            "VALUES (?, ?, ?, ?)",
            upserts,
        )
    if deletes:
        conn.executemany("DELETE FROM kv_index WHERE scope = ? AND key = ?", deletes)
    rows = [(*key, *v) for key, v in batch.history.items() if v is not None]
    gone = [key for key, v in batch.history.items() if v is None]
    if rows:
        conn.executemany(
            "INSERT OR REPLACE INTO kv_history(scope, key, stamp, op, flags, size, conflict, value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    if gone:
        conn.executemany(
            "DELETE FROM kv_history WHERE scope = ? AND key = ? AND stamp = ?", gone
        )
    if batch.scope_state:
        conn.executemany(
            "INSERT OR REPLACE INTO scope_state(scope, idx, kv_index, conflicts) VALUES (?, ?, ?, ?)",
            [(scope, *v) for scope, v in batch.scope_state.items()],
        )
    if batch.meta:
        conn.executemany(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", list(batch.meta.items())
        )


def _lock_directory(directory: Path) -> int:
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreLocked(
            f"data directory {directory} is in use by process {holder}; stop that agent "
            "or give this one another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _check_readonly(path: Path) -> None:
    """Fail with StoreCorrupt if ``path`` is not a healthy SQLite database."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()
            conn.execute("SELECT count(*) FROM meta").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise StoreCorrupt(
            f"{path} is not a readable Konsul database ({error}). It was left untouched: "
            "restore it from a backup, or move it away to start with an empty store."
        ) from error
    if result[0] != "ok":
        raise StoreCorrupt(
            f"{path} failed its integrity check ({result[0]}). It was left untouched: "
            "restore it from a backup, or move it away to start with an empty store."
        )


def _store_error(error: sqlite3.Error, path: Path) -> StoreError:
    code = getattr(error, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(error):
        return StoreFull(f"{path}: the disk is full; the write was not stored ({error})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreCorrupt(f"{path} is damaged ({error}); it was left untouched")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreLocked(f"{path} is locked by another process ({error})")
    return StoreError(f"{path}: {error}")

"""The SQLite store of the replicated state: one owner, WAL, group commit, durable acknowledgements.

:class:`Store` is the durable writer of ``sqlite_writer.py`` (one writer
thread, rounds of batches committed together, each writer released once its
round is durable, a failed round fails everything queued behind it while the
owner reloads) for ``konsul.db``: its rounds are :class:`WriteBatch` es, merged
into one and written with one ``executemany`` per table (``tables.commit_rows``).

Checkpoints (copying the WAL into the database file, then an fsync of it) take
tens of milliseconds. SQLite runs them inside a ``COMMIT`` once the WAL holds
1,000 pages, so every round queued behind would wait. Here a second thread with
its own connection runs them in ``PASSIVE`` mode, which neither blocks the
writer nor waits for it, every ``CHECKPOINT_PAGES`` WAL pages or so and after each
compaction. Under steady writes it never quite catches up (rounds append while
it copies), and the WAL starts over only once it is copied whole; so SQLite's
own checkpoint still runs at 1,000 pages, but finds most of the WAL copied
already and writes only the rest.

The data directory is locked with ``flock`` for the life of the process, and an
existing database is checked read-only before anything writes to it: a corrupt
file is reported by name and never overwritten.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from .batch import WriteBatch
from .errors import StoreCorrupt, StoreError, StoreLocked
from .sqlite_writer import (
    DURABILITY_MODES,
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    SqliteWriter,
    connect_writer,
    private_database,
    store_error,
)
from .tables import KNOWN_VERSIONS, SCHEMA_VERSION, commit_rows, prepare_schema

__all__ = ["DB_NAME", "DURABILITY_MODES", "SCHEMA_VERSION", "Store", "lock_directory", "private_database", "store_error"]

DB_NAME = "konsul.db"
LOCK_NAME = "LOCK"
# A snapshot restore accepted over HTTP, applied at the next start (sync/snapshot_restore.py).
# Named here so that a start can look for it without importing the snapshot code.
PENDING_RESTORE_NAME = "restore-pending.tar.gz"

# A background checkpoint once the rounds since the last one wrote about this
# many WAL pages (and after every compaction). A round writes about one page,
# plus one per KiB of CRDT updates: measured, a lone put's round 1.2 pages, a
# round of 33 puts (4.7 KB of updates, with their side values) 7. So lone puts
# checkpoint every 640 rounds, 33-put rounds every 128, well before SQLite's
# own checkpoint at WAL_BACKSTOP_PAGES. Each checkpoint ends with an fsync of
# the database file, which the disk serves between the commits' own.
CHECKPOINT_PAGES = 640
# SQLite's own checkpoint, inside a COMMIT, once the WAL holds this many pages
# (SQLite's default); it copies what the background one has not.
WAL_BACKSTOP_PAGES = 1000
# Once copied whole, the WAL starts over from its beginning; it is truncated to
# this size only if it grew past it. Big enough for the WAL between two
# checkpoints (the backstop's 1,000 pages of 4 KiB and their frame headers), so
# commits overwrite its blocks instead of growing the file: an fsync that grows
# a file must also commit its new size (ext4: a journal commit), and lone puts
# were about 20% slower with the WAL cut to 1 MiB after every checkpoint.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
# After a compaction, free pages go back to the file system once they are at
# least this many and a quarter of the file; fewer are reused by later writes,
# and giving them back only for the file to grow again costs writes for nothing.
VACUUM_MIN_FREE_PAGES = 256


class Store(SqliteWriter[WriteBatch]):
    """The durable store of one data directory.

    Open it with :meth:`open`, start :meth:`run` in a nursery, then
    :meth:`commit` batches. ``durability="relaxed"`` commits with
    ``synchronous=NORMAL``: a write survives a crash of the process but the
    last few may be lost on power loss.
    """

    thread_name = "konsul-store"

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int, durability: str = "full") -> None:
        super().__init__(path, conn, durability)
        self._lock_fd = lock_fd
        self._checkpointer: _Checkpointer | None = None
        self._pages_since_checkpoint = 0  # estimated, see CHECKPOINT_PAGES

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
        directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        lock_fd = _lock_directory(directory)
        path = directory / DB_NAME
        try:
            conn = connect_writer(
                path, durability, lambda conn: prepare_schema(conn, path), check=_check_readonly,
                pragmas=(
                    "auto_vacuum = INCREMENTAL", f"journal_size_limit = {WAL_SIZE_LIMIT}",
                    f"wal_autocheckpoint = {WAL_BACKSTOP_PAGES}", "busy_timeout = 0",
                ),
            )
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, conn, lock_fd, durability)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        os.close(self._lock_fd)

    # -- reading (start-up and maintenance, from the owner's thread) ----------

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

    def start_thread(self) -> None:
        self._checkpointer = _Checkpointer(self.path, DURABILITY_MODES[self.durability])
        self._checkpointer.start()

    def stop_thread(self) -> None:
        # A checkpoint in progress finishes; the thread then closes its
        # connection, before close() closes the writer's.
        if self._checkpointer is not None:
            self._checkpointer.stop()

    def commit_round(self, conn: sqlite3.Connection, batches: list[WriteBatch]) -> None:
        """Commit ``batches`` merged, in one transaction; then vacuum and checkpoint when due."""
        merged = WriteBatch.combine(batches)
        commit_rows(conn, merged)  # rolls back what it began, if anything fails
        self._pages_since_checkpoint += 1 + sum(len(update[3]) for update in merged.updates) // 1024
        if merged.snapshots:
            # A compaction just freed the old log.
            try:
                self._vacuum(VACUUM_MIN_FREE_PAGES)
            except sqlite3.Error:
                pass  # an optimisation only; the next compaction tries again
        if merged.snapshots or self._pages_since_checkpoint >= CHECKPOINT_PAGES:
            self._pages_since_checkpoint = 0
            if self._checkpointer is not None:
                self._checkpointer.request()

    def _vacuum(self, min_free_pages: int) -> None:
        """Give free pages back to the file system if there are enough of them."""
        conn = self._conn
        [(free,)] = conn.execute("PRAGMA freelist_count").fetchall()
        [(pages,)] = conn.execute("PRAGMA page_count").fetchall()
        if free and free >= min_free_pages and free * 4 >= pages:
            # Through executescript: execute() steps the pragma once, and each
            # step frees one page only.
            conn.executescript("PRAGMA incremental_vacuum;")

    def checkpoint(self) -> None:
        """Give every free page and the WAL back to the file system.

        Only while :meth:`run` is not running: it uses the writer's connection.
        """
        self._vacuum(1)
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


class _Checkpointer:
    """Copies the WAL into the database file on its own connection and thread.

    See the module doc. ``PASSIVE`` never waits on the writer and never makes
    it wait; a checkpoint that fails (a full disk) is tried again at the next
    request, and SQLite's own checkpoint remains the backstop.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._cond = threading.Condition()
        self._due = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="konsul-checkpoint", daemon=True)
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        with self._cond:
            self._due = True
            self._cond.notify()

    def stop(self) -> None:
        """Stop the thread and wait for it (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error:
            return  # the writer's own checkpoint takes over
        try:
            while True:
                with self._cond:
                    while not (self._due or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._due = False
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error:
                    pass
        finally:
            conn.close()


def _lock_directory(directory: Path) -> int:
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)
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
    """Fail if ``path`` is not a healthy SQLite database of a schema version we read."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
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
    version = row[0] if row else None
    if version is not None and version not in KNOWN_VERSIONS:
        raise StoreError(
            f"{path} has schema version {version}, which this agent does not know (it "
            f"reads {', '.join(map(str, KNOWN_VERSIONS))}). It was left untouched: run a "
            "newer agent on it."
        )


def lock_directory(directory: Path) -> int:
    """Lock a data directory as a running agent does (snapshot restores); the lock's descriptor.

    Raises:
        StoreLocked: an agent (or another restore) holds it.
    """
    return _lock_directory(directory)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (files created, renamed, removed) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""The SQLite store: one owner, WAL, group commit, durable acknowledgements.

Theory of operation
-------------------
Writers never touch SQLite. A writer applies its change in memory, fills a
:class:`WriteBatch` and awaits :meth:`Store.commit`, which adds the batch to the
*next round*. One writer thread owns the connection: it takes the next round
(every batch queued so far), runs it as one transaction and tells trio the
result through the trio token. While that transaction commits (the fsync is
the slow part), new batches queue up and go together in the next round: that
is group commit. Each writer is released only after its round is durable.

The thread is dedicated, not borrowed per round from ``trio.to_thread``: a
handoff costs one lock and one wakeup each way, and the thread starts the next
round the moment it is free, so one round's fsync overlaps the next's writers.

Checkpoints (copying the WAL into the database file, then an fsync of it) take
tens of milliseconds. SQLite runs them inside a ``COMMIT`` once the WAL holds
1,000 pages, so every round queued behind would wait. Here a second thread with
its own connection runs them in ``PASSIVE`` mode, which neither blocks the
writer nor waits for it, every ``CHECKPOINT_PAGES`` WAL pages or so and after each
compaction. Under steady writes it never quite catches up (rounds append while
it copies), and the WAL starts over only once it is copied whole; so SQLite's
own checkpoint still runs at 1,000 pages, but finds most of the WAL copied
already and writes only the rest.

If a round fails (disk full, I/O error) every batch of it, and every batch
queued behind it, fails; nothing of them is on disk. The writer thread waits
while the owner's ``on_failure`` hook reloads memory from disk, so memory never
shows what the disk does not hold and no later round builds on a lost one.

The data directory is locked with ``flock`` for the life of the process, and an
existing database is checked read-only before anything writes to it: a corrupt
file is reported by name and never overwritten.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .batch import WriteBatch
from .errors import StoreCorrupt, StoreError, StoreFull, StoreLocked
from .tables import KNOWN_VERSIONS, SCHEMA_VERSION, commit_rows, prepare_schema

__all__ = ["DB_NAME", "DURABILITY_MODES", "SCHEMA_VERSION", "Store", "lock_directory", "private_database", "store_error"]

DB_NAME = "konsul.db"
LOCK_NAME = "LOCK"

DURABILITY_MODES = {"full": "FULL", "relaxed": "NORMAL"}

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
# write_now() is offered only while the last round committed within this many
# seconds: it blocks the event loop for its commit, which a slow disk must not
# turn into a stall (see write_now).
WRITE_NOW_LIMIT = 0.002


class _Round:
    """Batches that commit in one transaction; their writers share one event."""

    __slots__ = ("batches", "done", "error")

    def __init__(self) -> None:
        self.batches: list[WriteBatch] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class Store:
    """The durable store of one data directory.

    Open it with :meth:`open`, start :meth:`run` in a nursery, then
    :meth:`commit` batches. ``durability="relaxed"`` commits with
    ``synchronous=NORMAL``: a write survives a crash of the process but the
    last few may be lost on power loss.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self.durability = "full"
        self._conn = conn
        self._lock_fd = lock_fd
        # _lock guards _next, _stopping and _paused, shared with the writer thread.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._next = _Round()
        self._stopping = False
        self._paused = False  # after a failed round, until the owner has reloaded
        self._failed: _Round | None = None
        self._crash: BaseException | None = None
        self._wakeup = trio.Event()  # for run(): a round failed or the thread ended
        self._running = False
        self._closed = False
        self.on_failure: Callable[[Exception], None] | None = None
        self.rounds = 0
        self.batches = 0
        self._checkpointer: _Checkpointer | None = None
        # Rounds queued or being written, as trio sees them (see idle).
        self._outstanding = 0
        self._pages_since_checkpoint = 0  # estimated, see CHECKPOINT_PAGES
        self._commits_fast = True  # the last round took under WRITE_NOW_LIMIT

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
            if path.exists():
                _check_readonly(path)
            private_database(path)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {DURABILITY_MODES[durability]}")
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
                conn.execute("PRAGMA busy_timeout = 0")
                prepare_schema(conn, path)
            except sqlite3.Error as error:
                conn.close()
                raise store_error(error, path) from error
            except BaseException:
                conn.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        store = cls(path, conn, lock_fd)
        store.durability = durability
        return store

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
        await self.wait(self.enqueue(batch))

    def enqueue(self, batch: WriteBatch) -> _Round:
        """Queue ``batch`` for the next round; :meth:`wait` on the result.

        Batches commit in the order they are queued, so a caller that must
        order its batches against others queues them synchronously.
        """
        if not self._running:
            raise StoreError("the store is not running")
        with self._lock:
            round_ = self._next
            if not round_.batches:
                self._outstanding += 1
            round_.batches.append(batch)
            self._work.notify()
        return round_

    @property
    def idle(self) -> bool:
        """Nothing is queued or being written: a batch queued now is written at once."""
        return self._outstanding == 0

    @property
    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may be used: the store is idle and its disk fast."""
        return (
            self._running
            and self.idle
            and not self._paused
            and self._failed is None
            and self._commits_fast
        )

    def write_now(self, batch: WriteBatch) -> None:
        """Commit ``batch`` on the calling (trio) thread; return once it is durable.

        For a lone write, which has nothing to share its round with: handing it
        to the writer thread and hearing back costs two thread wake-ups, more
        CPU than its commit (see docs/architecture.md, "The store"). It blocks
        the event loop for the commit, so it is offered (``can_write_now``) only
        while commits are fast, and only when the store is idle: the writer
        thread then waits for work and leaves the connection alone, and nothing
        can queue behind this batch while the loop is blocked.

        Raises :class:`StoreError` if the batch is not durable, once the
        owner's ``on_failure`` hook has reloaded memory from disk.
        """
        if not self.can_write_now:
            raise RuntimeError("write_now() while the store is busy, stopped or slow")
        try:
            self._write([batch])
        except StoreError as error:
            if self.on_failure is not None:
                self.on_failure(error)
            raise
        self.rounds += 1
        self.batches += 1

    async def wait(self, round_: _Round) -> None:
        """Return once ``round_`` is durable; raise :class:`StoreError` if it is not."""
        await round_.done.wait()
        if round_.error is not None:
            raise round_.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread; cancel this to stop (queued batches then fail)."""
        self._stopping = self._paused = False
        self._failed = self._crash = None
        self._wakeup, exited = trio.Event(), trio.Event()
        token = trio.lowlevel.current_trio_token()
        self._checkpointer = _Checkpointer(self.path, DURABILITY_MODES[self.durability])
        self._checkpointer.start()
        threading.Thread(
            target=self._write_forever, args=(token, exited), name="konsul-store", daemon=True
        ).start()
        self._running = True
        self._outstanding = 0
        task_status.started()
        try:
            while True:  # the thread wakes us only when something went wrong
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self._crash is not None:
                    raise self._crash
                if self._failed is not None:
                    self._recover(self._failed)
        finally:
            self._running = False
            with self._lock:
                self._stopping = True
                self._work.notify()
            # The round in flight finishes (and is acknowledged) first: a
            # transaction is never abandoned half way.
            with trio.CancelScope(shield=True):
                await exited.wait()
                # A checkpoint in progress finishes; the thread then closes its
                # connection, before close() closes the writer's.
                await trio.to_thread.run_sync(self._checkpointer.stop)
            if self._failed is not None:
                self._recover(self._failed)
            with self._lock:
                queued, self._next = self._next, _Round()
            queued.error = StoreError("the store shut down before this write was durable")
            queued.done.set()

    def _write_forever(self, token: trio.lowlevel.TrioToken, exited: trio.Event) -> None:
        """The writer thread: commit rounds until the store stops."""
        try:
            while True:
                with self._lock:
                    while not (self._stopping or (self._next.batches and not self._paused)):
                        self._work.wait()
                    if self._stopping:
                        return
                    round_, self._next = self._next, _Round()
                try:
                    self._write(round_.batches)
                except StoreError as error:
                    round_.error = error
                    with self._lock:
                        self._paused = True  # until the owner has reloaded
                except BaseException as error:  # a bug: fail the round, stop run()
                    round_.error = self._crash = error
                    return
                finally:
                    token.run_sync_soon(self._round_done, round_)
        finally:
            # After the last round's result: run_sync_soon keeps the order.
            token.run_sync_soon(exited.set)

    def _round_done(self, round_: _Round) -> None:
        """In trio, for each round the writer thread has finished."""
        self._outstanding -= 1
        if round_.error is None:
            self.rounds += 1
            self.batches += len(round_.batches)
        elif self._crash is None:
            self._failed = round_
            self._wakeup.set()
            return  # its writers learn of it in _recover
        else:
            self._wakeup.set()
        round_.done.set()

    def _recover(self, failed: _Round) -> None:
        """Fail a round and everything queued behind it, reload, resume writing."""
        self._failed = None
        with self._lock:
            queued, self._next = self._next, _Round()
        if queued.batches:
            self._outstanding -= 1
        queued.error = failed.error
        try:
            if self.on_failure is not None:
                self.on_failure(failed.error)  # type: ignore[arg-type]
        finally:
            # Writers hear of the failure once memory is back in step with the
            # disk, and the thread resumes only then.
            failed.done.set()
            queued.done.set()
            with self._lock:
                self._paused = False
                self._work.notify()

    def _write(self, batches: list[WriteBatch]) -> None:
        """Commit ``batches`` in one transaction (writer thread, or write_now)."""
        started = time.perf_counter()
        merged = WriteBatch.combine(batches)
        conn = self._conn
        try:
            commit_rows(conn, merged)  # rolls back what it began, if anything fails
        except sqlite3.Error as error:
            raise store_error(error, self.path) from error
        finally:
            self._commits_fast = time.perf_counter() - started < WRITE_NOW_LIMIT
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


# A data directory holds every key, device token hash and telemetry sample of
# its sites: readable by the agent's user only. Existing directories and files
# are tightened when they are opened, not only new ones.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_database(path: Path) -> None:
    """Make ``path`` (created empty if new), its directory, WAL and shared-memory files owner-only.

    SQLite creates ``-wal`` and ``-shm`` with the mode of the database file,
    so a database created here 0600 keeps its companions 0600 too.
    """
    os.chmod(path.parent, PRIVATE_DIR_MODE)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{path}{suffix}", PRIVATE_FILE_MODE)
        except FileNotFoundError:
            pass


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


def store_error(error: sqlite3.Error, path: Path) -> StoreError:
    """The typed error for a failed SQLite operation on ``path`` (any Konsul database file)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(error):
        return StoreFull(f"{path}: the disk is full; the write was not stored ({error})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreCorrupt(f"{path} is damaged ({error}); it was left untouched")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreLocked(f"{path} is locked by another process ({error})")
    return StoreError(f"{path}: {error}")


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

"""The one durable SQLite writer: a file opened checked, one writer thread, group commit.

Every SQLite file the agents write goes through :class:`SqliteWriter`: the
replicated state (``store.Store``, a subclass that commits ``WriteBatch``
rounds), the edge's telemetry buffer, the hub's telemetry store and the MQTT
broker's stored sessions (``mqtt-sessions.db``), the last three through
:meth:`SqliteWriter.transact`.

Theory of operation
-------------------
Writers never touch SQLite. A writer queues an item and awaits it; the item
joins the *next round*. One writer thread owns the connection: it takes the
next round (every item queued so far), commits it as one transaction
(:meth:`SqliteWriter.commit_round`) and tells trio the result through the
trio token. While that transaction commits (the fsync is the slow part), new
items queue up and go together in the next round: that is group commit. Each
writer is released only after its round is durable (``synchronous=FULL``, or
``NORMAL`` with durability "relaxed": a crash of the process loses nothing,
power loss may lose the last rounds).

The thread is dedicated, not borrowed per round from ``trio.to_thread``: a
handoff costs one lock and one wakeup each way, and the thread starts the next
round the moment it is free, so one round's fsync overlaps the next's writers.

If a round fails (disk full, I/O error) every item of it, and every item
queued behind it, fails; nothing of them is on disk. The writer thread waits
while the owner's ``on_failure`` hook reloads memory from disk, so memory never
shows what the disk does not hold and no later round builds on a lost one.

An existing file is checked read-only before anything writes to it: a corrupt
file is reported by name and never overwritten. (The data directory itself is
locked by its state store, ``store.Store.open``.)
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from .errors import StoreCorrupt, StoreError, StoreFull, StoreLocked

__all__ = [
    "DURABILITY_MODES",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SqliteWriter",
    "WriteRound",
    "check_readable",
    "connect_writer",
    "private_database",
    "store_error",
]

# --durability -> PRAGMA synchronous: when a commit returns, what it survives.
DURABILITY_MODES = {"full": "FULL", "relaxed": "NORMAL"}

# write_now() is offered only while the last round committed within this many
# seconds: it blocks the event loop for its commit, which a slow disk must not
# turn into a stall (see write_now).
WRITE_NOW_LIMIT = 0.002

# A data directory holds every key, device token hash and telemetry sample of
# its sites: readable by the agent's user only. Existing directories and files
# are tightened when they are opened, not only new ones.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

Item = TypeVar("Item")
T = TypeVar("T")

log = logging.getLogger("konsul.store")


class WriteRound:
    """Items that commit in one transaction; their writers share one event.

    A writer without a task of its own to wait in (a device gateway's
    acknowledgement) adds a callback with :meth:`when_done` instead.
    """

    __slots__ = ("items", "done", "error", "callbacks")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.callbacks: list[Callable[[BaseException | None], None]] | None = None

    def when_done(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` (in trio) once the round is durable (None) or has failed."""
        if self.done.is_set():
            callback(self.error)
        elif self.callbacks is None:
            self.callbacks = [callback]
        else:
            self.callbacks.append(callback)

    def finish(self) -> None:
        """Release the round's writers: its event, then its callbacks, in the order added."""
        self.done.set()
        callbacks, self.callbacks = self.callbacks, None
        for callback in callbacks or ():
            try:
                callback(self.error)
            except Exception:  # noqa: BLE001 - one writer's bug must not keep the others waiting
                log.exception("a write's completion callback failed")


class _Transaction:
    """A function to run on the writer connection inside a round, and what it returned."""

    __slots__ = ("function", "result")

    def __init__(self, function: Callable[[sqlite3.Connection], Any]) -> None:
        self.function = function
        self.result: Any = None


class SqliteWriter(Generic[Item]):
    """The only writer of one SQLite file.

    Make the connection with :func:`connect_writer`, start :meth:`run` in a
    nursery, then :meth:`transact` (or, in a subclass that overrides
    :meth:`commit_round`, :meth:`commit` its own items). Cancel :meth:`run` to
    stop; queued writes then fail.
    """

    thread_name = "konsul-sqlite"

    def __init__(self, path: Path, conn: sqlite3.Connection, durability: str = "full") -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability is one of {sorted(DURABILITY_MODES)}")
        self.path = path
        self.durability = durability
        self._conn = conn
        # _lock guards _next, _stopping and _paused, shared with the writer thread.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._next = WriteRound()
        self._stopping = False
        self._paused = False  # after a failed round, until the owner has reloaded
        self._failed: WriteRound | None = None
        self._crash: BaseException | None = None
        self._wakeup = trio.Event()  # for run(): a round failed or the thread ended
        self._running = False
        self._closed = False
        self.on_failure: Callable[[Exception], None] | None = None
        self.rounds = 0
        self.batches = 0  # items committed
        # Rounds queued or being written, as trio sees them (see idle).
        self._outstanding = 0
        self._commits_fast = True  # the last round took under WRITE_NOW_LIMIT

    # -- what a round is (subclasses override) ----------------------------------

    def commit_round(self, conn: sqlite3.Connection, items: list[Item]) -> None:
        """Commit ``items`` as one transaction, on the writer thread (or in :meth:`write_now`).

        This one runs the functions :meth:`transact` queued, in order, inside
        ``BEGIN IMMEDIATE ... COMMIT``; any error rolls all of them back.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                item.result = item.function(conn)  # type: ignore[attr-defined]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def start_thread(self) -> None:
        """Called by :meth:`run` before the writer thread starts (a subclass starts helpers here)."""

    def stop_thread(self) -> None:
        """Called (in a worker thread) once the writer thread has ended."""

    # -- life ----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close()

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read on the writer's connection: at start-up, or in ``on_failure`` (the thread waits then)."""
        return self._conn.execute(sql, params).fetchall()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread; cancel this to stop (queued items then fail)."""
        self._stopping = self._paused = False
        self._failed = self._crash = None
        self._wakeup, exited = trio.Event(), trio.Event()
        token = trio.lowlevel.current_trio_token()
        self.start_thread()
        threading.Thread(
            target=self._write_forever, args=(token, exited), name=self.thread_name, daemon=True
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
                await trio.to_thread.run_sync(self.stop_thread)
            if self._failed is not None:
                self._recover(self._failed)
            with self._lock:
                queued, self._next = self._next, WriteRound()
            queued.error = StoreError("the store shut down before this write was durable")
            queued.finish()

    # -- writing -----------------------------------------------------------------------

    async def commit(self, item: Item) -> None:
        """Return once ``item`` is durable; raise :class:`StoreError` if it is not."""
        await self.wait(self.enqueue(item))

    async def transact(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(conn)`` in the next round's transaction; its result once durable.

        ``function`` runs on the writer thread, with the functions queued with
        it, in the order queued; an error in any rolls the round back and is
        raised (as :class:`StoreError` for SQLite's) to every writer of it.
        """
        transaction = _Transaction(function)
        await self.wait(self.enqueue(transaction))  # type: ignore[arg-type]
        return transaction.result

    def enqueue(self, item: Item) -> WriteRound:
        """Queue ``item`` for the next round; :meth:`wait` on the result.

        Items commit in the order they are queued, so a caller that must
        order its items against others queues them synchronously.
        """
        if not self._running:
            raise StoreError("the store is not running")
        with self._lock:
            round_ = self._next
            if not round_.items:
                self._outstanding += 1
            round_.items.append(item)
            self._work.notify()
        return round_

    async def wait(self, round_: WriteRound) -> None:
        """Return once ``round_`` is durable; raise :class:`StoreError` if it is not."""
        await round_.done.wait()
        if round_.error is not None:
            raise round_.error

    @property
    def idle(self) -> bool:
        """Nothing is queued or being written: an item queued now is written at once."""
        return self._outstanding == 0

    @property
    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may be used: the writer is idle and its disk fast."""
        return (
            self._running
            and self.idle
            and not self._paused
            and self._failed is None
            and self._commits_fast
        )

    def write_now(self, item: Item) -> None:
        """Commit ``item`` on the calling (trio) thread; return once it is durable.

        For a lone write, which has nothing to share its round with: handing it
        to the writer thread and hearing back costs two thread wake-ups, more
        CPU than its commit (see docs/architecture.md, "The store"). It blocks
        the event loop for the commit, so it is offered (``can_write_now``) only
        while commits are fast, and only when the writer is idle: the writer
        thread then waits for work and leaves the connection alone, and nothing
        can queue behind this item while the loop is blocked.

        Raises :class:`StoreError` if the item is not durable, once the
        owner's ``on_failure`` hook has reloaded memory from disk.
        """
        if not self.can_write_now:
            raise RuntimeError("write_now() while the store is busy, stopped or slow")
        try:
            self._write([item])
        except StoreError as error:
            if self.on_failure is not None:
                self.on_failure(error)
            raise
        self.rounds += 1
        self.batches += 1

    def _write(self, items: list[Item]) -> None:
        """Commit ``items`` in one transaction (writer thread, or write_now)."""
        started = time.perf_counter()
        try:
            self.commit_round(self._conn, items)
        except sqlite3.Error as error:
            raise store_error(error, self.path) from error
        finally:
            self._commits_fast = time.perf_counter() - started < WRITE_NOW_LIMIT

    def _write_forever(self, token: trio.lowlevel.TrioToken, exited: trio.Event) -> None:
        """The writer thread: commit rounds until the writer stops."""
        try:
            while True:
                with self._lock:
                    while not (self._stopping or (self._next.items and not self._paused)):
                        self._work.wait()
                    if self._stopping:
                        return
                    round_, self._next = self._next, WriteRound()
                try:
                    self._write(round_.items)
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

    def _round_done(self, round_: WriteRound) -> None:
        """In trio, for each round the writer thread has finished."""
        self._outstanding -= 1
        if round_.error is None:
            self.rounds += 1
            self.batches += len(round_.items)
        elif self._crash is None:
            self._failed = round_
            self._wakeup.set()
            return  # its writers learn of it in _recover
        else:
            self._wakeup.set()
        round_.finish()

    def _recover(self, failed: WriteRound) -> None:
        """Fail a round and everything queued behind it, reload, resume writing."""
        self._failed = None
        with self._lock:
            queued, self._next = self._next, WriteRound()
        if queued.items:
            self._outstanding -= 1
        queued.error = failed.error
        try:
            if self.on_failure is not None:
                self.on_failure(failed.error)  # type: ignore[arg-type]
        finally:
            # Writers hear of the failure once memory is back in step with the
            # disk, and the thread resumes only then.
            failed.finish()
            queued.finish()
            with self._lock:
                self._paused = False
                self._work.notify()


def connect_writer(
    path: Path,
    durability: str,
    prepare: Callable[[sqlite3.Connection], None],
    *,
    check: Callable[[Path], None] | None = None,
    pragmas: tuple[str, ...] = (),
) -> sqlite3.Connection:
    """Open ``path`` for its one writer: checked, private, WAL, ``synchronous`` by durability.

    ``check`` (default :func:`check_readable`) judges an existing file
    read-only first; ``pragmas`` go before WAL is set (``auto_vacuum`` must),
    ``prepare`` makes or migrates the schema.

    Raises:
        StoreCorrupt: the file is damaged or not SQLite; it is left untouched.
    """
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability is one of {sorted(DURABILITY_MODES)}")
    if path.exists():
        (check or check_readable)(path)
    private_database(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {DURABILITY_MODES[durability]}")
        prepare(conn)
    except sqlite3.Error as error:
        conn.close()
        raise store_error(error, path) from error
    except BaseException:
        conn.close()
        raise
    return conn


def check_readable(path: Path, what: str = "database", advice: str = "move it away to start with an empty one") -> None:
    """Fail with :class:`StoreCorrupt` unless ``path`` is a healthy SQLite database (read-only check).

    ``what`` names the file in the message ("telemetry database"), ``advice`` says what to do.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise StoreCorrupt(f"{path} is not a readable {what} ({error}). It was left untouched: {advice}.") from error
    if result[0] != "ok":
        raise StoreCorrupt(f"{path} failed its integrity check ({result[0]}). It was left untouched: {advice}.")


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

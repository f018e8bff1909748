"""Helpers shared by the tests of ``konsul.sync`` (not a test module).

Nothing here replaces our own code: replicas are real, on real SQLite files,
and replication moves the real pycrdt updates between them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio.testing import wait_all_tasks_blocked

from konsul.sync.replica import Replica
from konsul.sync.scope import Scope

# Some fixed instant (2023-11-14T22:13:20Z) so that stamps are deterministic.
BASE_MS = 1_700_000_000_000


class WallClock:
    """A wall clock the test sets by hand (milliseconds since the epoch)."""

    def __init__(self, ms: int = BASE_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def trio_wall_ms() -> int:
    """A wall clock that follows trio's clock (and so a MockClock)."""
    return int(trio.current_time() * 1000) + BASE_MS


@asynccontextmanager
async def running(replica: Replica) -> AsyncIterator[Replica]:
    """Run a replica's committer and reaper for the block, then close it."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            try:
                yield replica
            finally:
                nursery.cancel_scope.cancel()
    finally:
        replica.close()


class Running:
    """A replica served in a nursery that the test can stop on its own."""

    def __init__(self, replica: Replica, cancel_scope: trio.CancelScope, done: trio.Event) -> None:
        self.replica = replica
        self._cancel_scope = cancel_scope
        self._done = done

    async def stop(self) -> None:
        """Cancel its tasks and close its store (releasing the data dir)."""
        self._cancel_scope.cancel()
        await self._done.wait()


async def serve(replica: Replica, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run ``replica`` until cancelled, then close it; starts with a :class:`Running`."""
    done = trio.Event()
    try:
        with trio.CancelScope() as cancel_scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(replica.run)
                task_status.started(Running(replica, cancel_scope, done))
    finally:
        replica.close()
        done.set()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds, with a deadline in real time.

    Under a MockClock a task waiting for the store's writer thread counts as
    blocked, so ``wait_all_tasks_blocked`` alone may return before, say, the
    reaper has finished a commit and acted on the next deadline. This polls
    the condition between such waits instead.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await wait_all_tasks_blocked()


async def send(src: Scope, dst: Scope, collection: str = "kv") -> set[str]:
    """Deliver everything ``src`` has and ``dst`` lacks, as one pycrdt update."""
    update = src.doc(collection).get_update(dst.doc(collection).get_state())
    return await dst.apply_remote(collection, update)


async def sync_all(scopes: list[Scope], collection: str = "kv") -> None:
    """Exchange updates until every scope has everything (two passes suffice)."""
    for _ in range(2):
        for src in scopes:
            for dst in scopes:
                if src is not dst:
                    await send(src, dst, collection)


def view(scope: Scope, keys: Iterable[str] = ()) -> dict[str, Any]:
    """Everything a user can read from a scope, to compare across restarts.

    ``keys`` names keys whose history to include even if they no longer exist.
    """
    kv = scope.kv
    names = sorted(set(keys) | set(kv.keys()))
    return {
        "entries": kv.list(""),
        "history": {key: kv.history(key) for key in names},
        "conflicts": kv.conflicts,
        "kv_index": kv.last_index,
        "services": scope.catalog.services(),
    }

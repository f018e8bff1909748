"""CoAP KV puts, applied in batches: one transaction and one commit for many.

A PUT used to cross into trio on its own (``trio_as_aio``: an asyncio future,
a trio task, a cancel scope) and join the scope's put group there. Under load
that crossing cost as much as the write. Now the asyncio side hands each
unconditional PUT to :meth:`KvWriter.submit`, a plain synchronous call (both
loops share one thread, see ``boundary.py``), and gets a future; one trio task
takes everything queued, applies it per scope with ``Scope.kv_apply`` (one
CRDT transaction, one store batch) and resolves the futures once the batch is
durable, or with the store's error if it is not. A 2.04 therefore still means
"on disk", as before. Batches are pipelined: up to :data:`COMMITS_IN_FLIGHT`
wait for the store at once, and those that queue together share a commit
round. Each batch here is a task of its own; the MQTT gateway, whose QoS 1
batches are a few messages each, keeps standing workers instead (see
``protocols/mqtt/core.py``), which this writer has not been measured with.

Conditional puts (``If-Match``, ``If-None-Match``) and deletes keep going
through ``Scope.kv_put`` / ``Scope.kv_delete`` one at a time: they answer
4.12 from the state at the moment they apply, which a batch cannot report
per write.

This module runs on trio and never imports asyncio: the futures come from the
factory the boundary hands in, and are only resolved here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from konsul.sync.errors import KonsulError, StoreError
from konsul.sync.scope import Scope

MAX_BATCH = 1000  # puts per transaction
COMMITS_IN_FLIGHT = 4  # batches applied and waiting for the store at once


class KvWriter:
    """Unconditional CoAP KV puts, queued and applied in durable batches."""

    def __init__(self, new_future: Callable[[], Any]) -> None:
        self._new_future = new_future
        self._queue: deque[tuple[Scope, str, bytes, Any]] = deque()
        self._pending: dict[tuple[str, str], int] = {}  # queued or applying, per (scope, key)
        self._wake = trio.Event()
        self._commits = trio.Semaphore(COMMITS_IN_FLIGHT)
        self._running = False

    def submit(self, scope: Scope, key: str, value: bytes) -> Any:
        """Queue a put; the returned (asyncio) future resolves once it is durable."""
        future = self._new_future()
        if not self._running:
            future.set_exception(StoreError("the CoAP gateway is shutting down"))
            return future
        self._queue.append((scope, key, value, future))
        name = (scope.name, key)
        self._pending[name] = self._pending.get(name, 0) + 1
        self._wake.set()
        return future

    def pending(self, scope: Scope, key: str) -> bool:
        """Whether a put of ``key`` is queued or not yet durable (it will exist)."""
        return (scope.name, key) in self._pending

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    while self._queue:
                        count = min(MAX_BATCH, len(self._queue))
                        by_scope: dict[str, list[tuple[Scope, str, bytes, Any]]] = {}
                        for _ in range(count):
                            put = self._queue.popleft()
                            by_scope.setdefault(put[0].name, []).append(put)
                        for puts in by_scope.values():
                            await self._commits.acquire()
                            await nursery.start(self._apply, puts)
        finally:
            self._running = False
            stopped = StoreError("the CoAP gateway shut down before this write was applied")
            while self._queue:
                self._settle(self._queue.popleft(), stopped)

    async def _apply(self, puts: list[tuple[Scope, str, bytes, Any]], *, task_status: trio.TaskStatus[None]) -> None:
        scope = puts[0][0]
        error: BaseException | None = None
        try:
            # kv_apply applies the puts in memory and queues them for the store
            # before its first checkpoint, which comes after ``started``: so
            # batches reach memory and the store in the order they were taken.
            task_status.started()
            await scope.kv_apply([("set", key, value, 0) for _scope, key, value, _future in puts])
        except KonsulError as exc:
            error = exc
        except BaseException:
            error = StoreError("the CoAP gateway stopped before this write was known to be durable")
            raise
        finally:
            self._commits.release()
            for put in puts:
                self._settle(put, error)

    def _settle(self, put: tuple[Scope, str, bytes, Any], error: BaseException | None) -> None:
        scope, key, _value, future = put
        name = (scope.name, key)
        left = self._pending.get(name, 0) - 1
        if left > 0:
            self._pending[name] = left
        else:
            self._pending.pop(name, None)
        if future.done():  # the request was given up on
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

"""Run the trio-asyncio loop's callbacks in batches, as asyncio itself does.

trio-asyncio (0.16) runs the asyncio side of the agent as one trio task that
takes callbacks from a trio memory channel one at a time, with a cancel
scope and a trio checkpoint per callback (``_main_loop_one``). Each asyncio
callback -- every task step, future callback, transport read and timer -- is
therefore one full turn of trio's scheduler, with an ``epoll_wait`` and the
bookkeeping of every other runnable task. asyncio's own loop runs every
callback that is ready in one go and polls for I/O once per turn.

:func:`run_callbacks_in_batches` makes the one loop (DESIGN.md, decision 2)
do the same: after the callback trio-asyncio waited for, it runs those that
were already queued and the timers already due, up to the number queued when
the turn began (so a callback that keeps rescheduling itself cannot starve
trio), then returns to trio's scheduler. Order is kept: callbacks run in the
order queued, and a trio task started from asyncio (``trio_as_aio``) is
still waited for until it has started, as trio-asyncio does. What it was
worth on bench/coap.py is in docs/benchmarks.md, CoAP.

Second, trio-asyncio checks every callback given to ``call_soon``,
``call_later`` and ``call_at`` for being a coroutine (``_check_callback``,
through ``inspect``), which asyncio does only in debug mode; that check was a
tenth of the CPU of a CoAP GET at the edge. Outside debug mode it is skipped
here too.

Third, trio-asyncio keeps a cancelled timer in its heap until it would have
fired. asyncio rebuilds its heap once more than half of it is cancelled
timers; without that, every ``asyncio.timeout`` around a read (the MQTT
connections' keep-alive deadline, 90 s ahead) left a handle behind, and the
heap grew by the read rate times 90 s, each push and pop comparing its way
through it. The same rule as asyncio's is applied here.

This replaces three methods of trio-asyncio's loop object. It checks the parts
it relies on and leaves the loop as it is (logging why) when they are not
there, e.g. after a trio-asyncio release changed them.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any

import trio

log = logging.getLogger("konsul.aio")

_MARK = "_konsul_batched"
_BATCH_LIMIT = 1000  # callbacks per trio turn, at most
_MIN_PURGE = 100  # cancelled timers before the heap is worth rebuilding


def _check_nothing(callback: Any, method: str) -> None:
    """asyncio's ``_check_callback`` outside debug mode: nothing."""


def run_callbacks_in_batches(loop: Any) -> bool:
    """Make ``loop`` (a running trio-asyncio loop) run ready callbacks in batches.

    Idempotent; returns whether the loop now batches.
    """
    if getattr(loop, _MARK, False):
        return True
    try:
        from sniffio import thread_local as sniffio_library
        from trio_asyncio._handles import AsyncHandle

        one = type(loop)._main_loop_one
        receive_nowait = loop._q_recv.receive_nowait
        statistics = loop._q_recv.statistics
        timers = loop._timers
        loop._nursery  # noqa: B018 - must exist
    except (AttributeError, ImportError) as exc:
        log.warning("trio-asyncio's loop has changed (%s); its callbacks run one per trio turn", exc)
        return False
    if not isinstance(timers, list):
        log.warning("trio-asyncio's loop has changed (timers); its callbacks run one per trio turn")
        return False

    async def main_loop_one(no_wait: bool = False) -> None:
        # trio-asyncio's own step: waits for one callback (or a due timer) and runs it
        await one(loop, no_wait)
        if no_wait:
            return  # shutting down: trio-asyncio drains the queue itself
        budget = min(_BATCH_LIMIT, statistics().current_buffer_used)
        now = loop.time()
        previous, sniffio_library.name = sniffio_library.name, "asyncio"
        try:
            while timers and timers[0]._when <= now:
                handle = heapq.heappop(timers)
                if not handle._cancelled:
                    handle._run()
            for _ in range(budget):
                try:
                    handle = receive_nowait()
                except trio.WouldBlock:
                    break
                if isinstance(handle, asyncio.TimerHandle):
                    if not handle._cancelled:  # cancelled before it got here
                        heapq.heappush(timers, handle)
                elif isinstance(handle, AsyncHandle):
                    sniffio_library.name = previous
                    handle._context.run(loop._nursery.start_soon, handle._run, name=handle._callback)
                    await handle._started.wait()
                    sniffio_library.name = "asyncio"
                elif not handle._cancelled:
                    handle._run()
        finally:
            sniffio_library.name = previous

    cancelled = 0

    def timer_handle_cancelled(handle: Any) -> None:
        # asyncio's rule (base_events.py): purge once more than half the
        # heap, and at least 100 handles, are cancelled timers.
        nonlocal cancelled
        cancelled += 1
        if cancelled > _MIN_PURGE and cancelled > len(timers) // 2:
            timers[:] = [timer for timer in timers if not timer._cancelled]
            heapq.heapify(timers)
            cancelled = 0

    loop._main_loop_one = main_loop_one
    loop._timer_handle_cancelled = timer_handle_cancelled
    if not loop.get_debug():
        loop._check_callback = _check_nothing
    setattr(loop, _MARK, True)
    return True

"""The fleet's CoAP devices on a plain asyncio loop in one thread of the simulator.

Measured on the 2-core machine (docs/benchmarks.md, "Fleet simulator"): 500
CoAP devices sending one sample a second each cost the simulator 69 % of a
core under trio-asyncio and 43 % on a plain asyncio loop, which also kept up
with the rate where trio-asyncio fell behind. aiocoap schedules some 30
asyncio callbacks per request, and each of those is a trip through trio's
scheduler under trio-asyncio. The agent keeps trio-asyncio (DESIGN.md,
decision 2); a device simulator has no such constraint, so its CoAP side gets
one thread with its own loop, and the trio side only hands devices over.

The thread counts into its own ``Counts`` (see ``FleetCounters``). It ends
when the trio task running :meth:`CoapThread.run` is cancelled; a device task
that fails with an unexpected error ends the thread, and the error is raised
in that trio task.
"""

from __future__ import annotations

import asyncio
import threading

import trio

from .device import CONNECTING_CONCURRENCY, Counts, SimDevice


class CoapThread:
    """Hosts CoAP devices; hand them over with :meth:`start_device` once :meth:`run` has started."""

    def __init__(self, base_uri: str, counts: Counts) -> None:
        self.base_uri = base_uri
        self.counts = counts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    async def run(self, *, task_status: trio.TaskStatus[CoapThread] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled; re-raises a device task's unexpected error."""
        token = trio.lowlevel.current_trio_token()
        started, ended = threading.Event(), trio.Event()

        def main() -> None:
            # An explicit loop factory: trio-asyncio (in `konsul dev`, the
            # agent in the same process) installs its own event loop policy.
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                try:
                    runner.run(self._serve(started))
                except BaseException as exc:  # noqa: BLE001 - handed to the trio side
                    self._error = exc
                finally:
                    started.set()
                    try:
                        trio.from_thread.run_sync(ended.set, trio_token=token)
                    except trio.RunFinishedError:
                        pass

        thread = threading.Thread(target=main, name="konsul-sim-coap", daemon=True)
        thread.start()
        await trio.to_thread.run_sync(started.wait)
        task_status.started(self)
        try:
            await ended.wait()
        finally:
            if not ended.is_set() and self._loop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
        if self._error is not None:
            raise self._error

    def start_device(self, device: SimDevice) -> None:
        """Start ``device`` on the thread (call from the trio side, after ``run`` started)."""
        assert self._loop is not None, "CoapThread.run has not started"
        self._loop.call_soon_threadsafe(self._spawn, device)

    # -- on the asyncio thread ------------------------------------------------------------

    async def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._connecting = asyncio.Semaphore(CONNECTING_CONCURRENCY)
        started.set()
        try:
            await self._stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._error is not None:
            raise self._error

    def _spawn(self, device: SimDevice) -> None:
        from .coap_device import run_coap_device

        task = self._loop.create_task(run_coap_device(device, self.base_uri, self.counts, self._connecting))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()
            self._stop.set()

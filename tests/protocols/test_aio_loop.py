"""The trio-asyncio loop running callbacks in batches keeps asyncio's ordering."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio

from konsul.protocols.aio_loop import run_callbacks_in_batches


async def test_callbacks_run_in_order_and_later_ones_next_turn() -> None:
    async with trio_asyncio.open_loop() as loop:
        assert run_callbacks_in_batches(loop)
        assert run_callbacks_in_batches(loop)  # idempotent
        seen: list[object] = []
        done = trio.Event()

        def first() -> None:
            seen.append(1)
            loop.call_soon(third)  # queued while a batch runs: runs after what was queued before

        def third() -> None:
            seen.append(3)
            done.set()

        loop.call_soon(first)
        loop.call_soon(seen.append, 2)
        await done.wait()
        assert seen == [1, 2, 3]


async def test_timers_fire_in_order_and_cancelled_ones_never() -> None:
    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        seen: list[str] = []
        done = trio.Event()
        loop.call_later(0.03, seen.append, "late")
        cancelled = loop.call_later(0.02, seen.append, "cancelled")
        loop.call_later(0.01, seen.append, "early")
        loop.call_later(0.05, done.set)
        cancelled.cancel()
        await done.wait()
        assert seen == ["early", "late"]


async def test_asyncio_tasks_and_trio_calls_cross_both_ways() -> None:
    async def trio_double(x: int) -> int:
        await trio.sleep(0)
        return 2 * x

    async def aio_main() -> list[int]:
        results = await asyncio.gather(*(trio_asyncio.trio_as_aio(trio_double)(i) for i in range(50)))
        await asyncio.sleep(0.001)
        return list(results)

    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        assert await trio_asyncio.aio_as_trio(aio_main)() == [2 * i for i in range(50)]


async def test_a_callback_that_reschedules_itself_does_not_starve_trio() -> None:
    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        spins = 0
        running = True

        def spin() -> None:
            nonlocal spins
            spins += 1
            if running:
                loop.call_soon(spin)

        loop.call_soon(spin)
        with trio.fail_after(5):
            await trio.sleep(0.01)  # a trio task still gets its turn
        running = False
        assert spins > 0


async def test_errors_in_callbacks_go_to_the_exception_handler() -> None:
    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        reported: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        done = trio.Event()

        def fail() -> None:
            raise ValueError("boom")

        loop.call_soon(fail)
        loop.call_soon(done.set)
        await done.wait()
        assert isinstance(reported[0]["exception"], ValueError)


async def test_cancelled_timers_do_not_pile_up_in_the_heap() -> None:
    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        fired = trio.Event()
        keep = loop.call_later(0.2, fired.set)
        handles = [loop.call_later(3600, fired.set) for _ in range(1000)]
        await _loop_turned(loop)  # the loop has taken them into its heap
        assert len(loop._timers) == 1001
        for handle in handles:
            handle.cancel()
        assert len(loop._timers) <= 500  # rebuilt once more than half was cancelled (asyncio's rule)
        assert keep in loop._timers
        loop.call_later(3600, fired.set).cancel()  # cancelled before it reaches the heap
        await _loop_turned(loop)
        assert len(loop._timers) <= 500
        with trio.fail_after(5):
            await fired.wait()


async def _loop_turned(loop) -> None:
    """Return once the loop has handled everything queued before this call."""
    turned = trio.Event()
    loop.call_soon(turned.set)
    await turned.wait()

"""An exception in an asyncio callback is counted and contained; the loop (and agent) go on."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio
from prometheus_client import CollectorRegistry

from konsul.protocols.aio_guard import contain_callback_errors
from konsul.protocols.aio_loop import run_callbacks_in_batches


def _failing() -> None:
    b"\xff".decode("utf-8")  # what aiocoap's option decoder raised for a Uri-Path


async def test_a_raising_callback_is_counted_and_the_loop_goes_on() -> None:
    registry = CollectorRegistry()
    async with trio_asyncio.open_loop() as loop:
        run_callbacks_in_batches(loop)
        handler = contain_callback_errors(loop, registry)
        assert contain_callback_errors(loop, registry) is handler  # idempotent per loop
        done = trio.Event()
        loop.call_soon(_failing)
        loop.call_later(0.01, _failing)

        async def failing_task() -> None:
            raise ValueError("a connection's task failed")

        task = loop.create_task(failing_task())
        loop.call_soon(lambda: task.add_done_callback(lambda t: t.exception() and None))
        loop.call_later(0.02, done.set)
        await done.wait()
        # the loop still runs callbacks and tasks
        assert await trio_asyncio.aio_as_trio(asyncio.sleep)(0, result=7) == 7
    assert registry.get_sample_value("konsul_asyncio_callback_errors_total", {"library": "other"}) == 2


async def test_without_containment_trio_asyncio_raises_it_into_the_agent() -> None:
    """What the handler prevents: trio-asyncio re-raises callback errors in its nursery."""
    raised = False
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.call_soon(_failing)
            with trio.fail_after(10):  # the error ends this wait; the deadline only bounds a failure
                await trio.sleep_forever()
    except BaseException as error:  # noqa: BLE001 - an ExceptionGroup or the error itself
        raised = "UnicodeDecodeError" in repr(error)
    assert raised

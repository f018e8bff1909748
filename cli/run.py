"""Running an agent in the foreground: signals, process limits, start-up errors."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from konsul.sync.errors import KonsulError


def run_until_signal(run: Callable[..., Any], config: Any, on_ready: Callable[[Any], None] | None = None) -> int:
    """Run an agent under trio until SIGTERM/SIGINT, then shut it down cleanly."""
    import trio  # here, so that client commands and --help start fast

    raise_open_file_limit()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(run, config)
                collect_garbage_less_often()
                if on_ready is not None:
                    on_ready(info)
                async for signum in signals:
                    logging.getLogger("konsul").info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseException as error:  # noqa: BLE001 - reported below or re-raised
        reason = _startup_error(error)
        if reason is None:
            raise
        print(f"konsul: {reason}", file=sys.stderr)
        return 2
    return 0


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    Every connection, observer and database holds a descriptor; the usual soft
    limit (1024) is below what the connection bounds allow (docs/operations.md).
    The listeners back off when it is reached anyway, but would then refuse
    everyone, not just the source that holds too many.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            logging.getLogger("konsul").warning("could not raise the open file limit from %d: %s", soft, error)


# Allocations (net) between two young-generation collections; CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def collect_garbage_less_often() -> None:
    """Tune the cyclic garbage collector for a long-running agent under load.

    A request through aiocoap leaves reference cycles behind (its pipes and
    callbacks), and objects that live for the few milliseconds a durable
    write takes are traversed by every young collection they see. With
    CPython's defaults the collector took a fifth of the CPU of a loaded
    edge answering CoAP PUTs (bench/coap.py); with a young generation of
    10,000 objects, under a tenth. Everything alive once the agent has
    started (modules, the loaded state) is moved out of the collector's
    sight (``gc.freeze``): it lives as long as the process, and full
    collections no longer walk it.
    """
    import gc

    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    gc.freeze()


def _startup_error(error: BaseException) -> BaseException | None:
    """The user-facing cause inside a (possibly nested) exception group, if any."""
    if isinstance(error, (KonsulError, OSError, ValueError)):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


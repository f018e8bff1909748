"""Contain exceptions raised in asyncio callbacks to the callback that raised them.

asyncio runs every callback (a transport's read, a task step, a timer) inside
``Handle._run``, which catches what the callback raises and hands it to the
loop's exception handler. On a plain asyncio loop the default handler logs it
and the loop goes on. trio-asyncio's default handler (``TrioEventLoop.
default_exception_handler``) also re-raises it in the loop's trio nursery --
which cancels the loop and, through the agent's nurseries, ends the process.
So one datagram aiocoap could not decode (a Uri-Path that is not UTF-8)
stopped the whole agent.

:func:`contain_callback_errors` installs a handler on the one asyncio loop the
CoAP gateway runs on (DESIGN.md, decision 2; MQTT is on trio) that does what asyncio's own does --
the callback's work is lost, the loop goes on -- and counts each error in
``konsul_asyncio_callback_errors_total{library}``, with a log line
rate-limited per library and exception type (a peer that trips the same bug
in a loop must not fill the disk). What the callback was serving (one
datagram, one request's task, one connection's task) is what is lost; the
socket's reader, the other tasks and the agent go on.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from konsul.sync.log_limits import peer_log

log = logging.getLogger("konsul.aio")

_MARK = "_konsul_contained"
# Label values: the libraries that run on the loop, else "other" (bounded cardinality).
LIBRARIES = ("aiocoap", "konsul")


def library_of(exception: BaseException | None, context: dict[str, Any]) -> str:
    """The library whose code raised: the innermost traceback frame from one we know."""
    modules = [frame.f_globals.get("__name__", "") for frame, _line in traceback.walk_tb(
        exception.__traceback__ if exception is not None else None
    )]
    for module in reversed(modules):
        top = module.split(".", 1)[0]
        if top in LIBRARIES:
            return top
    callback = getattr(context.get("handle"), "_callback", None) or context.get("task")
    module = getattr(callback, "__module__", "") or type(callback).__module__
    top = module.split(".", 1)[0]
    return top if top in LIBRARIES else "other"


class CallbackErrors:
    """The exception handler: count, log (rate-limited), carry on."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.counter = Counter(
            "konsul_asyncio_callback_errors",
            "Exceptions raised in asyncio callbacks (aiocoap) and contained there, by library",
            ["library"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        library = library_of(exception, context)
        self.counter.labels(library).inc()
        kind = type(exception).__name__ if exception is not None else "no exception"
        peer_log.log(
            log,
            logging.WARNING,
            ("asyncio_callback", library, kind),
            "contained an error in an asyncio callback (%s, %s): %s",
            library,
            context.get("message", "no message"),
            exception if exception is not None else "-",
        )
        if exception is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("the contained error", exc_info=exception)


def contain_callback_errors(loop: Any, registry: CollectorRegistry | None) -> CallbackErrors:
    """Make ``loop`` count and log callback errors instead of ending the agent.

    Idempotent per loop: each device gateway calls it, the first one's
    registry gets the counter (both gateways are given the agent's one).
    """
    handler = getattr(loop, _MARK, None)
    if handler is None:
        handler = CallbackErrors(registry)
        loop.set_exception_handler(handler)
        setattr(loop, _MARK, handler)
    return handler

"""One queued notification per observation, however many writes a silent observer misses.

aiocoap sends confirmable messages to one peer one at a time (NSTART = 1,
RFC 7252 4.7) and queues the rest in a per-peer backlog until the one in
flight is acknowledged or times out (some 45 s of retransmissions). An
observer that never acknowledges -- a device that went away, or a peer that
registers observations and stays silent on purpose -- gets one notification
per write and observation queued, without bound: 200 such observations and
300 writes held 110 MB.

Observe is eventually consistent (RFC 7641 3.4/4.5): only the newest
notification of an observation matters. :func:`coalesce_notifications` makes
a new notification replace one of the same observation still waiting in the
backlog, so the backlog holds at most one per observation (and observations
are bounded per source, limits.py). Anything else that would grow a peer's
backlog past :data:`MAX_BACKLOG` is dropped and counted (``backlog_full``):
confirmable messages to a peer that acknowledges nothing are not delivered
anyway.

This reaches into aiocoap's ``MessageManager`` (``send_message``,
``_backlogs``); if their shape changes, aiocoap's own queueing stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .limits import peer_source

log = logging.getLogger("konsul.coap")

MAX_BACKLOG = 1024  # messages queued for one peer, at most (observations per source are fewer)


def coalesce_notifications(manager: Any, refused: Callable[[str, str], None]) -> None:
    """Install the coalescing on one aiocoap ``MessageManager``."""
    try:
        send_message = manager.send_message
        backlogs = manager._backlogs
    except AttributeError as exc:
        log.debug("aiocoap's backlog kept as it is: %s", exc)
        return
    if not isinstance(backlogs, dict):
        return

    def send(message: Any, monitor: Any = None) -> Any:
        backlog = backlogs.get(message.remote)
        if backlog:
            if message.opt.observe is not None:
                token = message.token
                kept = [(queued, waiting) for queued, waiting in backlog if queued.token != token]
                if len(kept) != len(backlog):
                    backlog[:] = kept  # the older notification of this observation is superseded
            if len(backlog) >= MAX_BACKLOG:
                refused("backlog_full", peer_source(message.remote))
                return None
        return send_message(message, monitor)

    manager.send_message = send

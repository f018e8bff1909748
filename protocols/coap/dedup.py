"""Duplicate detection (RFC 7252 4.5) that leaves nothing for the garbage collector.

aiocoap remembers every message it receives for EXCHANGE_LIFETIME (247 s)
so that a retransmitted request is answered with the same response instead of
being processed twice. It does that with one asyncio timer per message and
keeps the response ``Message`` -- which references its request, both option
sets, the remote, transport tunings -- until the timer fires: some thirty
objects per request that the cyclic garbage collector traverses again and
again. Under load (bench/coap.py, 1,000 requests/s) that held 250,000
requests' objects at a time, and the collector took about 30% of the
edge's CPU.

:func:`compact_duplicates` replaces that bookkeeping on aiocoap's message
manager with the same rule kept in plain data: a dict from (address, message
id) to the encoded response (bytes, or None while the request is being
answered) and one queue of expiry times in arrival order, swept as messages
come in. No timer, no callback, and only tuples of strings, numbers and bytes,
which the collector stops tracking. A duplicate confirmable request gets the
stored response again, byte for byte; any other duplicate is ignored, as
aiocoap does.

This reaches into aiocoap's ``MessageManager`` (``_deduplicate_message``,
``_store_response_for_duplicates``) and its UDP transport; if their shape
changes, aiocoap's own bookkeeping stays.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Any

log = logging.getLogger("konsul.coap")


def compact_duplicates(manager: Any) -> None:
    """Install the compact duplicate cache on one aiocoap ``MessageManager``."""
    try:
        from aiocoap.numbers.types import CON

        interface = manager.message_interface
        transport = interface.transport
        sendmsg = transport.sendmsg
        loop = manager.loop
        manager._deduplicate_message  # noqa: B018 - must exist
        manager._store_response_for_duplicates  # noqa: B018
    except (ImportError, AttributeError) as exc:
        log.debug("aiocoap's duplicate detection kept: %s", exc)
        return
    if type(interface).__name__ != "MessageInterfaceUDP6":
        return

    recent: dict[tuple, tuple | None] = {}
    expiry: deque[tuple[float, tuple]] = deque()

    def deduplicate(message: Any) -> bool:
        now = loop.time()
        while expiry and expiry[0][0] <= now:
            recent.pop(expiry.popleft()[1], None)
        key = (message.remote.sockaddr[:-1], message.mid)
        if key in recent:
            stored = recent[key]
            if message.mtype is CON and stored is not None:
                data, sockaddr, pktinfo = stored
                ancdata = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
                sendmsg(data, ancdata, 0, sockaddr)
            return True
        recent[key] = None
        expiry.append((now + message.transport_tuning.EXCHANGE_LIFETIME, key))
        return False

    def store_response(message: Any) -> None:
        remote = message.remote
        key = (remote.sockaddr[:-1], message.mid)
        if key in recent:
            recent[key] = (message.encode(), remote.sockaddr, remote.pktinfo)

    manager._deduplicate_message = deduplicate
    manager._store_response_for_duplicates = store_response

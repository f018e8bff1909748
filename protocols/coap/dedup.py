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

The cache is bounded (``NetworkLimits.coap_duplicate_entries`` and
``..._per_source``): every datagram with a new message id adds an entry for
247 s, so a peer sending fast could otherwise grow it without end. Past the
total the oldest entry is forgotten first; past its own bound a source's new
messages are processed without being remembered (a retransmission of one of
them is then answered afresh, which RFC 7252 4.5 allows for idempotent
requests and which only that source can cause). Both are counted
(``duplicates_total`` / ``duplicates_per_source`` in konsul_coap_refused_total).

This reaches into aiocoap's ``MessageManager`` (``_deduplicate_message``,
``_store_response_for_duplicates``) and its UDP transport; if their shape
changes, aiocoap's own bookkeeping stays.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("konsul.coap")


def compact_duplicates(
    manager: Any,
    total: int = 50_000,
    per_source: int = 5_000,
    refused: Callable[[str, str], None] | None = None,
) -> None:
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
    held: dict[str, int] = {}  # entries per source host
    count = refused or (lambda reason, source: None)

    def forget_oldest() -> None:
        key = expiry.popleft()[1]
        if recent.pop(key, False) is not False:
            host = key[0][0]
            if held[host] <= 1:
                del held[host]
            else:
                held[host] -= 1

    def deduplicate(message: Any) -> bool:
        now = loop.time()
        while expiry and expiry[0][0] <= now:
            forget_oldest()
        key = (message.remote.sockaddr[:-1], message.mid)
        if key in recent:
            stored = recent[key]
            if message.mtype is CON and stored is not None:
                data, sockaddr, pktinfo = stored
                ancdata = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
                sendmsg(data, ancdata, 0, sockaddr)
            return True
        host = key[0][0]
        if held.get(host, 0) >= per_source:
            count("duplicates_per_source", host)
            return False  # processed, not remembered
        if len(recent) >= total:
            count("duplicates_total", host)
            forget_oldest()
        held[host] = held.get(host, 0) + 1
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

"""Block-wise transfer (RFC 7959) details aiocoap leaves to the resource.

aiocoap reassembles Block1 uploads and splits Block2 answers for ordinary
requests, but:

- its upload spool has no size limit, so a device could stream blocks until
  the agent runs out of memory. :class:`LimitedBlock1Spool` refuses with 4.13
  (and Size1 = the limit, as RFC 7959 4 asks) as soon as the announced size
  (Size1) or the bytes received pass ``gateways.max_payload``;
- Observe notifications bypass the Block2 splitting, so a large value would be
  sent as one oversized datagram. :func:`first_block` sends block 0 and keeps
  the whole representation where aiocoap's Block2 cache serves the following
  blocks, which the client fetches with ordinary GETs (RFC 7959 3.4).

Both reach into aiocoap internals (``_assemblies``, ``_completes``,
``_extract_block_key``); the interop tests upload and observe 100 KiB values
to catch an aiocoap change that breaks them.
"""

from __future__ import annotations

from aiocoap import Message
from aiocoap.blockwise import Block1Spool, Block2Cache, _extract_block_key
from aiocoap.numbers.codes import Code

from .errors import CoapError


def too_large(limit: int, size: int | None = None) -> CoapError:
    got = f"; this one has {size}" if size else ""
    return CoapError(
        Code.REQUEST_ENTITY_TOO_LARGE,
        "payload_too_large",
        f"a request payload is at most {limit} bytes{got}",
        size1=limit,
    )


class LimitedBlock1Spool(Block1Spool):
    """aiocoap's Block1 reassembly, refusing uploads larger than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def feed_and_take(self, req: Message) -> Message:
        block1 = req.opt.block1
        if block1 is None:
            if len(req.payload) > self.limit:
                raise too_large(self.limit, len(req.payload))
            return req
        announced = req.opt.size1
        if (announced is not None and announced > self.limit) or block1.start + len(req.payload) > self.limit:
            # drop what was gathered so far: the upload cannot succeed
            self._assemblies._items.pop(_extract_block_key(req), None)
            raise too_large(self.limit, announced)
        return super().feed_and_take(req)


def first_block(request: Message, response: Message, cache: Block2Cache) -> Message:
    """``response`` as it goes out in an Observe notification.

    A representation that fits one datagram goes whole; a larger one goes as
    block 0, with the rest served from ``cache`` to the GETs for block 1 on.
    """
    limit = request.remote.maximum_payload_size
    if len(response.payload) <= limit:
        return response
    cache._completes[_extract_block_key(request)] = response
    return response._extract_block(0, request.remote.maximum_block_size_exp, limit)

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

    A representation that fits one block goes whole; a larger one goes as
    block 0, with the rest served from ``cache`` to the GETs for block 1 on.
    A block is as large as the transport allows or as the client asked with
    Block2 in its Observe request, whichever is smaller (RFC 7959 2.4: the
    client's size or smaller), for the first answer and every notification.
    """
    limit = request.remote.maximum_payload_size
    size_exponent = request.remote.maximum_block_size_exp
    asked = request.opt.block2
    if asked is not None:
        size_exponent = min(size_exponent, asked.size_exponent)
    if len(response.payload) <= min(limit, 2 ** (size_exponent + 4)):
        return response
    cache._completes[_extract_block_key(request)] = response
    return response._extract_block(0, size_exponent, limit)


def check_block_options(request: Message) -> None:
    """4.00 for a Block1 or Block2 option with the reserved size exponent 7 (RFC 7959 2.2).

    Over UDP, 7 means nothing (RFC 8323 gives it a meaning over TCP only);
    aiocoap took it for a 1024-byte block and answered 2.31 Continue.
    """
    for name, block in (("Block1", request.opt.block1), ("Block2", request.opt.block2)):
        if block is not None and block.size_exponent == 7:
            raise CoapError(
                Code.BAD_REQUEST,
                "bad_block_option",
                f"{name} has the reserved size exponent 7; use 0 to 6 (16 to 1024 bytes)",
            )

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

from collections.abc import Iterator
from typing import Any

from aiocoap import Message
from aiocoap.blockwise import Block1Spool, Block2Cache, _extract_block_key
from aiocoap.numbers.codes import Code
from aiocoap.util.asyncio.timeoutdict import TimeoutDict

from .errors import CoapError
from .limits import Refused, peer_source


def too_large(limit: int, size: int | None = None) -> CoapError:
    got = f"; this one has {size}" if size else ""
    return CoapError(
        Code.REQUEST_ENTITY_TOO_LARGE,
        "payload_too_large",
        f"a request payload is at most {limit} bytes{got}",
        size1=limit,
    )


class TransferBudget:
    """Block-wise transfers held at once: per source, in total, and their bytes together.

    aiocoap keeps a Block1 upload being assembled, and a large answer whose
    blocks a client fetches one GET at a time, for MAX_TRANSMIT_WAIT (93 s)
    after its last use, one per (client address, request options). A peer
    varying a query parameter could make it hold any number of them (a copy
    of a 500 KB value each). Past a bound a new transfer is answered 5.03
    with a diagnostic (``transfers_per_source``, ``transfers_total``,
    ``transfer_bytes`` in konsul_coap_refused_total); transfers under way go
    on. The stores are aiocoap's own timeout dicts, counted when a transfer
    starts (a few hundred entries at most, so counting beats bookkeeping that
    aiocoap's silent expiry would have to be kept in step with).
    """

    def __init__(self, total: int, per_source: int, total_bytes: int, refused: Refused) -> None:
        self.total, self.per_source, self.total_bytes = total, per_source, total_bytes
        self.refused = refused
        self.stores: list[TimeoutDict] = []

    def store(self) -> TimeoutDict:
        """A new timeout dict whose entries count against this budget."""
        store = BoundedTimeoutDict(_TRANSFER_LIFETIME, self)
        self.stores.append(store)
        return store

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for store in self.stores:
            yield from store._items.items()

    def bytes_held(self) -> int:
        return sum(len(message.payload) for _key, message in self._entries())

    def check_new(self, key: Any, size: int) -> None:
        """Raise 5.03 if a transfer for ``key`` (a block key) may not start now."""
        source = _source_of_key(key)
        count = from_source = used = 0
        for other, message in self._entries():
            count += 1
            used += len(message.payload)
            if _source_of_key(other) == source:
                from_source += 1
        if from_source >= self.per_source:
            bound = "per_source"
        elif count >= self.total:
            bound = "total"
        elif used + size > self.total_bytes:
            bound = "bytes"
        else:
            return
        self.refused(f"transfers_{bound}" if bound != "bytes" else "transfer_bytes", source)
        raise CoapError(
            Code.SERVICE_UNAVAILABLE,
            "too_many_transfers",
            "too many block-wise transfers are under way (from this address or in all); "
            "finish or abandon one (they lapse 93 s after their last block) and retry",
            max_age=30,
        )

    def check_growth(self, size: int) -> None:
        """Raise 5.03 if ``size`` more bytes in a transfer under way would pass the byte bound."""
        if self.bytes_held() + size > self.total_bytes:
            self.refused("transfer_bytes", "")
            raise CoapError(
                Code.SERVICE_UNAVAILABLE,
                "too_many_transfers",
                "block-wise transfers hold all the memory they may; retry the upload later",
                max_age=30,
            )


def _source_of_key(key: Any) -> str:
    """The client address of a block key: ((sockaddr, pktinfo), code, options) for UDP."""
    remote = key[0]
    return peer_source(remote[0] if isinstance(remote, tuple) else remote)


_TRANSFER_LIFETIME = 93.0  # aiocoap's MAX_TRANSMIT_WAIT, what its own spool and cache use


class BoundedTimeoutDict(TimeoutDict):
    """aiocoap's timeout dict, admitting a new key only within a :class:`TransferBudget`."""

    def __init__(self, timeout: float, budget: TransferBudget) -> None:
        super().__init__(timeout)
        self.budget = budget

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self._items:
            self.budget.check_new(key, len(value.payload))
        super().__setitem__(key, value)


class LimitedBlock2Cache(Block2Cache):
    """aiocoap's Block2 cache, holding answers within a :class:`TransferBudget`."""

    def __init__(self, budget: TransferBudget) -> None:
        super().__init__()
        self._completes = budget.store()


class LimitedBlock1Spool(Block1Spool):
    """aiocoap's Block1 reassembly, refusing uploads larger than ``limit`` bytes.

    With a ``budget``, the uploads being assembled count against it too.
    """

    def __init__(self, limit: int, budget: TransferBudget | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.budget = budget
        if budget is not None:
            self._assemblies = budget.store()

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
        if block1.more and len(req.payload) != block1.size:
            # RFC 7959 2.3: every block but the last is exactly the block size;
            # aiocoap took a short first block and misplaced the ones after it.
            self._assemblies._items.pop(_extract_block_key(req), None)
            raise CoapError(
                Code.BAD_REQUEST,
                "bad_block",
                f"block {block1.block_number} has {len(req.payload)} bytes and more to come; "
                f"every block but the last has the block size, {block1.size}",
            )
        if self.budget is not None and block1.block_number > 0:
            self.budget.check_growth(len(req.payload))
        try:
            return super().feed_and_take(req)
        except ValueError:
            # aiocoap raises a bare ValueError (answered 5.00) for a block that
            # does not continue the upload where it stands (a gap, or a repeat
            # at another size): RFC 7959 2.5 makes that 4.08.
            self._assemblies._items.pop(_extract_block_key(req), None)
            raise CoapError(
                Code.REQUEST_ENTITY_INCOMPLETE,
                "incomplete",
                f"block {block1.block_number} does not continue the upload where it stands; restart it at block 0",
            ) from None


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

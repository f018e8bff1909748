"""The sync protocol's messages on the wire: CBOR maps, one per frame.

Every message is a CBOR map with a type field ``t``. The schema below is the
whole protocol; :func:`decode` checks a frame against it, so the session only
ever sees well-formed messages, and a peer that sends anything else gets a
clear error naming the field.

==========  =====================================================================
``t``       fields (type)
==========  =====================================================================
hello       v (int, protocol version), site (str), replica (str), role (str),
            scopes (list of str), now (int, the sender's wall clock in ms)
error       code (str), detail (str)
sv          s (scope), c (collection), e (epoch int), sv (bytes: Yjs state vector)
data        n (seq int), s, c, e, u (bytes: Yjs update)
snap        n, s, c, e, u (bytes: the full state of epoch e, to adopt)
ack         n, s, c, e, sv (bytes: the receiver's state after storing n)
eph         s, k (kind str), d (any CBOR value), no acknowledgement
==========  =====================================================================
"""

from __future__ import annotations

import re
from typing import Any

import cbor2

# 2: version ids carry compact stamps and KV payloads may be plain values
# (sync/hlc.py, sync/kv.py); a version 1 agent could not read them.
# 3: a hello carries the sender's wall clock (``now``), which the other side
# checks (a peer whose clock runs far ahead is refused).
PROTOCOL_VERSION = 3
MAX_FRAME_BYTES = 64 * 1024 * 1024
# A frame is a handful of fields; a diff or snapshot is one byte string in it.
# Only ephemeral messages (check and presence snapshots, telemetry batches)
# carry structure, a few levels deep. These bound what decoding a frame may
# build in memory before anything looks at it: 64 MiB of one-byte empty maps
# would otherwise become 64 million dicts (gigabytes).
MAX_FRAME_DEPTH = 16
MAX_FRAME_ITEMS = 1_000_000
MAX_NAME_BYTES = 256  # a site, replica, collection, kind or error code
MAX_DETAIL_BYTES = 4096  # an error frame's explanation
_INT64 = 2**63  # sequence numbers, epochs and versions are SQLite INTEGERs

# Scope (site) names: they name directories on the hub.
SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The fleet-wide scope every edge syncs besides its own site's.
GLOBAL_SCOPE = "global"

_SCOPED = {"s": str, "c": str, "e": int}
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"v": int, "site": str, "replica": str, "role": str, "scopes": list, "now": int},
    "error": {"code": str, "detail": str},
    "sv": {**_SCOPED, "sv": bytes},
    "data": {"n": int, **_SCOPED, "u": bytes},
    "snap": {"n": int, **_SCOPED, "u": bytes},
    "ack": {"n": int, **_SCOPED, "sv": bytes},
    "eph": {"s": str, "k": str, "d": object},
}


class WireError(ValueError):
    """A frame that is not a valid protocol message."""


def encode(message: dict[str, Any]) -> bytes:
    return cbor2.dumps(message)


def decode(frame: bytes) -> dict[str, Any]:
    """Parse and validate one frame; raises :class:`WireError` (and nothing else)."""
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    # Checked before decoding: the structure's depth and size, and that it is
    # plain CBOR (no tags, so no dates, sets or big numbers built from it).
    end = scan_cbor(frame, 0, MAX_FRAME_DEPTH, MAX_FRAME_ITEMS)
    if end != len(frame):
        raise WireError(f"{len(frame) - end} bytes after the message")
    try:
        message = cbor2.loads(frame)
    except Exception as error:  # noqa: BLE001 - cbor2 raises several types for bad input
        raise WireError(f"not CBOR: {error}") from None
    if not isinstance(message, dict):
        raise WireError("a message is a CBOR map")
    kind = message.get("t")
    fields = SCHEMA.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"unknown message type {str(kind)[:40]!r}")
    for name, expected in fields.items():
        if name not in message:
            raise WireError(f"{kind} message lacks field {name!r}")
        value = message[name]
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise WireError(f"{kind}.{name} has the wrong type")
        if expected is int and not -_INT64 <= value < _INT64:
            raise WireError(f"{kind}.{name} is outside 64 bits")
        if expected is str and len(value) > (MAX_DETAIL_BYTES if name == "detail" else MAX_NAME_BYTES):
            raise WireError(f"{kind}.{name} is too long")
    return message


def scan_cbor(data: bytes, pos: int = 0, max_depth: int = MAX_FRAME_DEPTH, max_items: int = MAX_FRAME_ITEMS) -> int:
    """Walk one plain CBOR item from ``pos`` without building it; returns where it ends.

    Raises :class:`WireError` for truncated data, tags, reserved encodings,
    nesting deeper than ``max_depth`` or more than ``max_items`` items. Runs in
    a loop (no recursion) and costs a few operations per item; byte and text
    strings are skipped whole.
    """
    end = len(data)
    # Per open container: items still expected, or -1 until a break (indefinite).
    open_: list[int] = []
    items = 0
    while True:
        if pos >= end:
            raise WireError("truncated CBOR")
        initial = data[pos]
        pos += 1
        if initial == 0xFF:  # the break that ends an indefinite container
            if not open_ or open_[-1] != -1:
                raise WireError("a CBOR break outside an indefinite container")
            open_.pop()
        else:
            items += 1
            if items > max_items:
                raise WireError(f"more than {max_items} CBOR items")
            major, info = initial >> 5, initial & 0x1F
            if major == 6:
                raise WireError("CBOR tags are not part of the protocol")
            if info == 31:
                if major in (2, 3):
                    pos = _skip_chunks(data, pos, major)
                elif major in (4, 5):
                    if len(open_) >= max_depth:
                        raise WireError(f"CBOR nested deeper than {max_depth} levels")
                    open_.append(-1)
                    continue
                else:
                    raise WireError("an invalid CBOR item")
            else:
                argument, pos = _argument(data, pos, info)
                if major == 7:
                    if info == 24 and argument < 32:
                        raise WireError("an invalid CBOR simple value")
                elif major in (2, 3):
                    pos += argument
                    if pos > end:
                        raise WireError("truncated CBOR")
                elif major in (4, 5):
                    count = argument * (2 if major == 5 else 1)
                    if count:
                        if len(open_) >= max_depth:
                            raise WireError(f"CBOR nested deeper than {max_depth} levels")
                        if count > end - pos:  # each item takes a byte at least
                            raise WireError("truncated CBOR")
                        open_.append(count)
                        continue
        # One item complete: count it against the containers it closes.
        while open_ and open_[-1] > 0:
            open_[-1] -= 1
            if open_[-1]:
                break
            open_.pop()
        if not open_:
            return pos


def _argument(data: bytes, pos: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, pos
    if info > 27:
        raise WireError("a reserved CBOR length encoding")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise WireError("truncated CBOR")
    return int.from_bytes(data[pos:pos + size], "big"), pos + size


def _skip_chunks(data: bytes, pos: int, major: int) -> int:
    """Skip an indefinite-length string's chunks and its break."""
    while True:
        if pos >= len(data):
            raise WireError("truncated CBOR")
        initial = data[pos]
        pos += 1
        if initial == 0xFF:
            return pos
        if initial >> 5 != major or initial & 0x1F == 31:
            raise WireError("an invalid chunk in an indefinite CBOR string")
        length, pos = _argument(data, pos, initial & 0x1F)
        pos += length
        if pos > len(data):
            raise WireError("truncated CBOR")


class Lib0Reader:
    """Reads Yjs's binary encoding (lib0): unsigned varints, 7 bits a byte, and length-prefixed bytes.

    Shared by the state-vector decoder here and the update check
    (sync/update_check.py); ``error`` is what each raises for input that is
    truncated or holds a number beyond 64 bits, ``what`` names the input in
    its messages.
    """

    def __init__(self, data: bytes, error: type[WireError] = WireError, what: str = "data") -> None:
        self.data = data
        self.pos = 0
        self.error = error
        self.what = what

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.error(f"truncated {self.what}")
        self.pos += 1
        return self.data[self.pos - 1]

    def varuint(self) -> int:
        shift = result = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise self.error(f"a number in the {self.what} is too large")

    def count(self, what: str) -> int:
        """A count of things that each take a byte at least: never more than the bytes left."""
        found = self.varuint()
        if found > len(self.data) - self.pos:
            raise self.error(f"truncated {self.what} ({found} {what} announced)")
        return found

    def buffer(self) -> bytes:
        size = self.varuint()
        end = self.pos + size
        if end > len(self.data):
            raise self.error(f"truncated {self.what}")
        found, self.pos = self.data[self.pos:end], end
        return found

    def string(self) -> str:
        try:
            return self.buffer().decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"a name in the {self.what} is not UTF-8") from None


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector (varuint count, then client/clock varuint pairs) as a dict."""
    reader = Lib0Reader(data, what="state vector")
    vector = {}
    for _ in range(reader.count("clients")):
        client = reader.varuint()
        vector[client] = reader.varuint()
    return vector


def covers(have: dict[int, int], wanted: dict[int, int]) -> bool:
    """Whether a replica at state ``have`` holds everything of state ``wanted``."""
    return all(have.get(client, 0) >= clock for client, clock in wanted.items())

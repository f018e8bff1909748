"""The sync protocol's messages on the wire: CBOR maps, one per frame.

Every message is a CBOR map with a type field ``t``. The schema below is the
whole protocol; :func:`decode` checks a frame against it, so the session only
ever sees well-formed messages, and a peer that sends anything else gets a
clear error naming the field.

==========  =====================================================================
``t``       fields (type)
==========  =====================================================================
hello       v (int, protocol version), site (str), replica (str), role (str),
            scopes (list of str)
error       code (str), detail (str)
sv          s (scope), c (collection), e (epoch int), sv (bytes: Yjs state vector)
data        n (seq int), s, c, e, u (bytes: Yjs update)
snap        n, s, c, e, u (bytes: the full state of epoch e, to adopt)
ack         n, s, c, e, sv (bytes: the receiver's state after storing n)
eph         s, k (kind str), d (any CBOR value), no acknowledgement
==========  =====================================================================
"""

from __future__ import annotations

from typing import Any

import cbor2

# 2: version ids carry compact stamps and KV payloads may be plain values
# (sync/hlc.py, sync/kv.py); a version 1 agent could not read them.
PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 64 * 1024 * 1024

_SCOPED = {"s": str, "c": str, "e": int}
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"v": int, "site": str, "replica": str, "role": str, "scopes": list},
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
    """Parse and validate one frame; raises :class:`WireError`."""
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        message = cbor2.loads(frame)
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError, RecursionError) as error:
        raise WireError(f"not CBOR: {error}") from None
    if not isinstance(message, dict):
        raise WireError("a message is a CBOR map")
    kind = message.get("t")
    fields = SCHEMA.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise WireError(f"unknown message type {kind!r}")
    for name, expected in fields.items():
        if name not in message:
            raise WireError(f"{kind} message lacks field {name!r}")
        value = message[name]
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise WireError(f"{kind}.{name} has the wrong type")
    return message


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector (varuint count, then client/clock varuint pairs) as a dict."""
    pos = 0

    def varuint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise WireError("truncated state vector")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
            if shift > 70:
                raise WireError("state vector number too large")

    count = varuint()
    vector = {}
    for _ in range(count):
        client = varuint()
        vector[client] = varuint()
    return vector


def covers(have: dict[int, int], wanted: dict[int, int]) -> bool:
    """Whether a replica at state ``have`` holds everything of state ``wanted``."""
    return all(have.get(client, 0) >= clock for client, clock in wanted.items())

"""Checks a Yjs update from a peer before it touches a document.

pycrdt integrates an update first and tells observers after: a version whose
id or payload our readers refuse would already be in the document (in memory,
not on disk) by the time the refusal comes, and later local updates would
build on it. So every update that arrives over sync is read here first, in
Yjs's v1 encoding (lib0 numbers and strings), without building a document:

- every item belongs to the root map ``versions`` (the only shared type the
  collections use) and holds one byte string, the version's payload;
- a map entry's name is a version id, ``<key> NUL <stamp>``, with a stamp
  :meth:`Stamp.decode` reads;
- a payload is bounded, and is what its collection's readers decode: for KV a
  plain value or CBOR ``[value, flags, expires_ms]``, for the others plain
  CBOR within the document limits (sync/limits.py).

Items that name no parent (they continue an entry the document has, through
their origin) carry the entry's name implicitly; their payload is checked the
same way. Anything else (text, nested types, JSON or "Any" values other than
one byte string, subdocuments) is refused: no replica writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import cbor2
import trio

from .hlc import Stamp
from .limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_ITEMS, MAX_VALUE_BYTES
from .wire import Lib0Reader, WireError, scan_cbor

ROOT = "versions"
MAX_PAYLOAD_BYTES = max(MAX_VALUE_BYTES, MAX_DOCUMENT_BYTES) + 1024  # a value and its CBOR wrapping
MAX_VERSION_ID_BYTES = 4096
_PLAIN = 0x00  # a KV payload that is the value as it is (sync/kv.py)
_ANY_BUFFER = 116  # lib0's type byte for a Uint8Array inside ContentAny
_CONTENT_DELETED, _CONTENT_ANY, _CONTENT_BINARY = 1, 8, 3
_GC, _SKIP = 0, 10
# Updates above this size are checked on a worker thread (the check is pure
# Python and costs about a microsecond per item), so one large diff does not
# hold up every other connection's frames while it is read.
CHECK_IN_THREAD_BYTES = 64 * 1024

T = TypeVar("T")


class UpdateRefused(WireError):
    """An update that no replica of ours could have written."""


def is_panic(error: BaseException) -> bool:
    """Whether ``error`` is a Rust panic surfaced by pyo3 (a BaseException, not an Exception).

    A group counts when it holds a panic beside nothing but Exceptions (a
    panic in an observer callback reaches the caller as such a group); one
    that holds a cancellation does not.
    """
    if type(error).__name__ == "PanicException":
        return True
    if isinstance(error, BaseExceptionGroup):
        inner = error.exceptions
        return any(is_panic(e) for e in inner) and all(isinstance(e, Exception) or is_panic(e) for e in inner)
    return False


async def check_update_soon(update: bytes, collection: str) -> None:
    """:func:`check_update`, on a worker thread for a large update."""
    if len(update) > CHECK_IN_THREAD_BYTES:
        await trio.to_thread.run_sync(check_update, update, collection)
    else:
        check_update(update, collection)


def refusing_panics(merge: Callable[[], T]) -> T:
    """``merge()``, where pycrdt takes a peer's update; a pycrdt panic becomes :class:`UpdateRefused`.

    The check above refuses every update known to make yrs panic; this is
    the guard for one it does not know yet, so that it ends the exchange
    with that peer and never the process.
    """
    try:
        return merge()
    except BaseException as error:
        if not is_panic(error):
            raise
        raise UpdateRefused(f"the CRDT library could not take the update: {str(error)[:120]}") from None


def check_update(update: bytes, collection: str) -> None:
    """Raise :class:`UpdateRefused` unless ``update`` holds only well-formed versions."""
    reader = Lib0Reader(update, UpdateRefused, "update")
    for _ in range(reader.count("clients")):
        structs = reader.count("structs")
        reader.varuint()  # client
        reader.varuint()  # first clock
        for _ in range(structs):
            _check_struct(reader, collection)
    for _ in range(reader.count("delete-set clients")):
        reader.varuint()  # client
        for _ in range(reader.count("deleted ranges")):
            reader.varuint()  # clock
            reader.varuint()  # length
    if reader.pos != len(update):
        raise UpdateRefused(f"{len(update) - reader.pos} bytes after the update")


def check_payload(payload: bytes, collection: str) -> None:
    """Raise :class:`UpdateRefused` unless ``payload`` is a version payload of ``collection``."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise UpdateRefused(f"a version payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if not payload:
        return  # a tombstone
    if collection == "kv":
        if payload[0] == _PLAIN:
            return
        try:
            if scan_cbor(payload, 0, 2, 4) != len(payload):
                raise UpdateRefused("data after a KV payload")
            value, flags, expires = cbor2.loads(payload)
        except (WireError, ValueError, TypeError, cbor2.CBORDecodeError) as error:
            raise UpdateRefused(f"a KV payload is [value, flags, expires_ms]: {error}") from None
        if (
            not isinstance(value, bytes)
            or type(flags) is not int or not 0 <= flags < 2**64
            or not (expires is None or type(expires) is int and 0 <= expires < 2**63)
        ):
            raise UpdateRefused("a KV payload is [value bytes, flags uint64, expires_ms int or null]")
        return
    try:
        end = scan_cbor(payload, 0, MAX_DOCUMENT_DEPTH + 2, MAX_DOCUMENT_ITEMS)
    except WireError as error:
        raise UpdateRefused(f"a {collection} payload: {error}") from None
    if end != len(payload):
        raise UpdateRefused(f"data after a {collection} payload")


def check_version_id(vid: str) -> Stamp:
    """The stamp of a well-formed version id; raises :class:`UpdateRefused`."""
    key, sep, text = vid.partition("\x00")
    if not sep or not key or len(vid) > MAX_VERSION_ID_BYTES:
        raise UpdateRefused(f"{vid[:60]!r} is not a version id")
    try:
        return Stamp.decode(text)
    except (ValueError, TypeError):
        raise UpdateRefused(f"{vid[:60]!r} does not name a stamp") from None


def _check_struct(reader: Lib0Reader, collection: str) -> None:
    info = reader.byte()
    ref = info & 0x1F
    if ref in (_GC, _SKIP):
        _length(reader)
        return
    has_origin, has_right_origin = info & 0x80, info & 0x40
    if has_origin:
        reader.varuint(), reader.varuint()
    if has_right_origin:
        reader.varuint(), reader.varuint()
    if not (has_origin or has_right_origin):
        if reader.varuint() != 1:
            raise UpdateRefused("an item inside a nested type; versions live in the root map only")
        root = reader.string()
        if root != ROOT:
            raise UpdateRefused(f"an item of the root type {root[:60]!r}; versions live in {ROOT!r}")
        if not info & 0x20:
            raise UpdateRefused("a root-level item that is no map entry")
        check_version_id(reader.string())
    if ref == _CONTENT_DELETED:
        _length(reader)
    elif ref == _CONTENT_ANY:
        if reader.varuint() != 1 or reader.byte() != _ANY_BUFFER:
            raise UpdateRefused("a version holds one byte string")
        check_payload(reader.buffer(), collection)
    elif ref == _CONTENT_BINARY:
        check_payload(reader.buffer(), collection)
    else:
        raise UpdateRefused(f"item content of kind {ref}; versions hold byte strings")


def _length(reader: Lib0Reader) -> int:
    """The length of a block of deleted or collected items: one at least.

    yrs 0.28 stores a zero-length block, and every later diff of the document
    then divides by zero (a Rust panic, which pyo3 raises as a BaseException
    that passes every ``except Exception``). No replica writes one.
    """
    length = reader.varuint()
    if length == 0:
        raise UpdateRefused("a block of length 0")
    return length

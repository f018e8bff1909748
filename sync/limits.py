"""Key and value rules shared by every protocol."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InvalidArgument, InvalidKey, ValueTooLarge

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 512 * 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid KV key, else raise :class:`InvalidKey`.

    Keys are UTF-8, 1 to 512 bytes, with no leading ``/``, no NUL and no ``..``
    path segment.
    """
    # Every put checks its key: take the usual one (ASCII, no "..") in one test.
    if (
        type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES
        and key[0] != "/" and "\x00" not in key and ".." not in key
    ):
        return key
    if check_prefix(key) == "":
        raise InvalidKey("a key must not be empty")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key` but allows the empty prefix (the whole keyspace)."""
    if not isinstance(prefix, str):
        raise InvalidKey("a key is a string")
    try:
        size = len(prefix.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a key must be valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a key is at most {MAX_KEY_BYTES} bytes; this one has {size}")
    if "\x00" in prefix:
        raise InvalidKey("a key must not contain NUL")
    if prefix.startswith("/"):
        raise InvalidKey("a key must not start with '/'")
    if ".." in prefix.split("/"):
        raise InvalidKey("a key must not contain a '..' segment")
    return prefix


def check_value(value: bytes) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise ValueTooLarge(
            f"a value is at most {MAX_VALUE_BYTES} bytes; this one has {len(value)}"
        )
    return value


def check_flags(flags: int) -> int:
    if not 0 <= flags < 2**64:
        raise InvalidArgument("flags is an unsigned 64-bit integer")
    return flags


# -- structured values (JSON and CBOR documents) ------------------------------------
#
# One rule set for every structured value that enters from outside: HTTP bodies,
# MQTT and CoAP payloads, sync frames. A value passes here before it costs memory
# in the store or reaches a reader that might refuse it later (DESIGN.md,
# decision 8): a desired state nested 900 levels deep was once stored and then
# refused by the CBOR reader on every start.

MAX_DOCUMENT_DEPTH = 32  # nested objects/arrays; a twin or telemetry sample needs a handful
MAX_DOCUMENT_BYTES = 512 * 1024  # the encoded size of one document
MAX_DOCUMENT_ITEMS = 10_000  # values in one document, all levels together
_INT_LIMIT = 2**64  # CBOR's major types 0/1; JSON numbers beyond it are not portable
_SCALARS = (str, bool, type(None))


def check_document(value: Any, what: str = "document") -> Any:
    """Return ``value`` if it is a JSON-shaped document within the limits.

    JSON-shaped: objects with string keys, arrays, strings, finite numbers
    (integers within 64 bits), booleans and null; nested at most
    :data:`MAX_DOCUMENT_DEPTH` levels and holding at most
    :data:`MAX_DOCUMENT_ITEMS` values. Raises :class:`InvalidArgument`
    naming what is wrong. Walks iteratively, so no depth can exhaust the stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > MAX_DOCUMENT_ITEMS:
            raise InvalidArgument(f"{what} holds more than {MAX_DOCUMENT_ITEMS} values")
        kind = type(node)
        if kind in _SCALARS:
            continue
        if kind is int:
            if not -_INT_LIMIT <= node < _INT_LIMIT:
                raise InvalidArgument(f"{what} holds an integer outside 64 bits")
            continue
        if kind is float:
            if not math.isfinite(node):
                raise InvalidArgument(f"{what} holds {node!r}, which JSON has no number for")
            continue
        if kind is dict or kind is list:
            if depth >= MAX_DOCUMENT_DEPTH and node:
                raise InvalidArgument(f"{what} is nested deeper than {MAX_DOCUMENT_DEPTH} levels")
            if kind is dict:
                for name, child in node.items():
                    if type(name) is not str:
                        raise InvalidArgument(f"{what} has an object key that is not a string")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in node)
            continue
        raise InvalidArgument(f"{what} holds a {kind.__name__}, which is not a JSON value")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_document(raw: bytes | str, what: str = "document") -> Any:
    """Parse untrusted JSON into a document that passes :func:`check_document`.

    Refuses, with :class:`InvalidArgument` (or :class:`ValueTooLarge` for the
    size): text over :data:`MAX_DOCUMENT_BYTES`, invalid UTF-8, ``NaN`` and
    ``Infinity``, and anything :func:`check_document` refuses.
    """
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ValueTooLarge(f"{what} is at most {MAX_DOCUMENT_BYTES} bytes; this one has {len(raw)}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        if len(text) - len(text.lstrip("[{ \t\r\n")) > MAX_DOCUMENT_DEPTH:
            raise InvalidArgument(f"{what} is nested deeper than {MAX_DOCUMENT_DEPTH} levels")
        value = json.loads(text, parse_constant=_refuse_constant)
    except InvalidArgument:
        raise
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested deeper than {MAX_DOCUMENT_DEPTH} levels") from None
    except ValueError as error:  # json.JSONDecodeError is one
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    return check_document(value, what)


def decode_cbor_document(raw: bytes, what: str = "document") -> Any:
    """Decode untrusted CBOR into a document that passes :func:`check_document`.

    Tags, undefined, byte strings and other CBOR-only values are refused, as
    is anything the decoder itself refuses (truncated or trailing data,
    nesting past its own limit).
    """
    import cbor2

    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ValueTooLarge(f"{what} is at most {MAX_DOCUMENT_BYTES} bytes; this one has {len(raw)}")
    try:
        value = cbor2.loads(raw)
    except RecursionError:
        raise InvalidArgument(f"{what} is nested deeper than {MAX_DOCUMENT_DEPTH} levels") from None
    except Exception as error:  # noqa: BLE001 - cbor2 raises several types for bad input
        raise InvalidArgument(f"{what} is not valid CBOR: {error}") from None
    return check_document(value, what)

"""How KV values and device documents travel in each CoAP content format.

A KV value is bytes. Each format has one exact rule, so a value read in any
format can be written back in the same format and comes out unchanged:

==========================  ============================  ============================
format                      PUT stores                    GET answers
==========================  ============================  ============================
CBOR (60, the default)      a byte string as is, a text   a byte string holding the
                            string as its UTF-8           value (always possible)
JSON (50)                   the JSON document verbatim    the value itself, if it is
                            (must parse)                  a JSON document, else 4.06
text/plain (0)              the text verbatim (UTF-8)     the value, if UTF-8, else 4.06
octet-stream (42)           the bytes verbatim            the bytes verbatim
==========================  ============================  ============================

A request without Content-Format is CBOR, and a GET without Accept answers
CBOR (CONTRACT.md). Device documents (telemetry, reported and desired state)
are a CBOR map with text keys or a JSON object.

Structured values follow the agent's one rule set for documents from outside
(``sync/limits.py``: nesting, size, item count, finite numbers, 64-bit
integers, text keys), the same as over HTTP and MQTT: a JSON KV value or a
device document past it is refused with 4.00 (4.13 for the size) and a
diagnostic, and changes nothing.
"""

from __future__ import annotations

import io
import json
from typing import Any

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from konsul.sync.errors import InvalidArgument, ValueTooLarge
from konsul.sync.limits import decode_cbor_document, parse_json_document

from .errors import CoapError, bad_request, from_konsul

TEXT = 0
OCTETS = 42
JSON = 50
CBOR = 60

NAMES = {CBOR: "CBOR", JSON: "JSON", TEXT: "text/plain", OCTETS: "octet-stream"}
VALUE_FORMATS = (CBOR, JSON, TEXT, OCTETS)
DOCUMENT_FORMATS = (CBOR, JSON)


def _listing(formats: tuple[int, ...]) -> str:
    return ", ".join(f"{NAMES[f]} ({f})" for f in formats)


def request_format(request: Message, allowed: tuple[int, ...]) -> int:
    """The request payload's format; 4.15 if this resource does not take it."""
    fmt = request.opt.content_format
    fmt = CBOR if fmt is None else int(fmt)
    if fmt not in allowed:
        raise CoapError(
            Code.UNSUPPORTED_CONTENT_FORMAT,
            "unsupported_content_format",
            f"content-format {fmt} is not accepted here; send {_listing(allowed)}",
        )
    return fmt


def response_format(request: Message, allowed: tuple[int, ...]) -> int:
    """The format to answer in; 4.06 if the client accepts none this resource has."""
    fmt = request.opt.accept
    fmt = CBOR if fmt is None else int(fmt)
    if fmt not in allowed:
        raise CoapError(
            Code.NOT_ACCEPTABLE,
            "not_acceptable",
            f"cannot answer in content-format {fmt}; ask for {_listing(allowed)}",
        )
    return fmt


def strict_cbor(payload: bytes) -> Any:
    """One complete CBOR item, nothing after it; 4.00 otherwise."""
    stream = io.BytesIO(payload)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise bad_request(f"the payload is not valid CBOR ({exc})", "malformed_cbor") from None
    if stream.tell() != len(payload):
        raise bad_request("the payload has bytes after its CBOR item", "malformed_cbor")
    return item


def strict_json(payload: bytes) -> Any:
    """A JSON document within the shared limits; 4.00 ``malformed_json`` (4.13 for the size) otherwise."""
    try:
        return parse_json_document(payload, "the payload")
    except ValueTooLarge as exc:
        raise from_konsul(exc) from None
    except InvalidArgument as exc:
        raise bad_request(str(exc), "malformed_json") from None


def value_from_payload(payload: bytes, fmt: int) -> bytes:
    """The KV value a PUT payload in ``fmt`` stands for."""
    if fmt == CBOR:
        item = strict_cbor(payload)
        if isinstance(item, bytes):
            return item
        if isinstance(item, str):
            return item.encode("utf-8")
        raise bad_request(
            "a KV value in CBOR is a byte string or a text string; wrap structured data "
            "in a byte string or send it as JSON (50)",
            "bad_value",
        )
    if fmt == JSON:
        strict_json(payload)
        return payload
    if fmt == TEXT:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("text/plain must be UTF-8; send octet-stream (42) for bytes", "bad_value") from None
    return payload


def value_to_payload(value: bytes, fmt: int) -> bytes:
    """``value`` in ``fmt``; 4.06 where the value has no form in it."""
    if fmt == CBOR:
        return cbor2.dumps(value)
    if fmt in (TEXT, JSON):
        try:
            value.decode("utf-8")
            if fmt == JSON:
                parse_json_document(value, "the value")
        except (UnicodeDecodeError, InvalidArgument, ValueTooLarge):
            wanted = "UTF-8 text" if fmt == TEXT else "a JSON document within the document limits"
            raise CoapError(
                Code.NOT_ACCEPTABLE,
                "not_acceptable",
                f"this value is not {wanted}; ask for CBOR (60) or octet-stream (42)",
            ) from None
    return value


def document_from_payload(payload: bytes, fmt: int) -> dict[str, Any]:
    """A device document: a CBOR map or a JSON object within the shared limits; 4.00 otherwise."""
    try:
        if fmt == CBOR:
            document = decode_cbor_document(payload, "the document")
        else:
            document = parse_json_document(payload, "the document")
    except ValueTooLarge as exc:
        raise from_konsul(exc) from None
    except InvalidArgument as exc:
        raise bad_request(str(exc), "bad_document") from None
    if not isinstance(document, dict):
        kind = "a CBOR map" if fmt == CBOR else "a JSON object"
        raise bad_request(f"the payload must be {kind}", "bad_document")
    return document


def document_to_payload(document: Any, fmt: int) -> bytes:
    if fmt == CBOR:
        return cbor2.dumps(document)
    return json.dumps(document, separators=(",", ":")).encode("utf-8")

"""Responses: bodies whole or streamed, JSON, and the error form every failure takes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

# What a response without a stated type is (quart's default, which clients have seen).
DEFAULT_CONTENT_TYPE = "text/html; charset=utf-8"


class Response:
    """A status, headers and a body: bytes, or an async iterator of chunks (streamed).

    A streamed body goes out chunk by chunk; give ``Content-Length`` in
    ``headers`` when it is known, else it is sent chunked.
    """

    __slots__ = ("body", "status_code", "headers", "content_type")

    def __init__(
        self, body: bytes | str | AsyncIterator[bytes] = b"", status: int = 200,
        headers: dict[str, str] | None = None, content_type: str | None = None,
    ) -> None:
        self.body = body.encode() if isinstance(body, str) else body
        self.status_code = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.content_type = content_type or DEFAULT_CONTENT_TYPE

    @property
    def streamed(self) -> bool:
        return not isinstance(self.body, (bytes, bytearray))

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        """The headers as sent: the type, the length of a whole body, then the route's own."""
        pairs = [(b"content-type", self.content_type.encode("latin-1"))]
        if not self.streamed:
            pairs.append((b"content-length", b"%d" % len(self.body)))
        for name, value in self.headers.items():
            lower = name.lower()
            if lower == "content-length" and not self.streamed:
                continue
            pairs.append((lower.encode("latin-1"), str(value).encode("latin-1")))
        return pairs

    def head(self) -> bytes:
        """``header_pairs`` as HTTP/1.1 header lines, for a whole body (the KV fast path writes them itself)."""
        parts = [b"content-type: ", self.content_type.encode("latin-1"), b"\r\ncontent-length: %d\r\n" % len(self.body)]
        for name, value in self.headers.items():
            lower = name.lower()
            if lower != "content-length":
                parts += (lower.encode("latin-1"), b": ", str(value).encode("latin-1"), b"\r\n")
        return b"".join(parts)


# One encoder: json.dumps with separators= builds a new one on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_ENCODE(body).encode(), status, headers, "application/json")


def error_response(status: int, code: str, detail: str) -> Response:
    """CONTRACT.md's error form: ``{"error": <short code>, "detail": <what to do>}``."""
    return json_response({"error": code, "detail": detail}, status=status)

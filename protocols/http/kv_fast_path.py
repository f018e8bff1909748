"""The plain Consul KV read, write and delete, answered before hypercorn's protocol core.

Why. A durable ``PUT /v1/kv/<key>`` costs konsul ~200 µs of CPU, and h11
alone, before any ASGI, ~300 µs on the benchmark machine (docs/benchmarks.md,
"HTTP KV"). So the requests that carry the load are recognised in the bytes
and handed to the app without the protocol core and the ASGI round trip:
the answer is the app's own (``HttpApp.respond`` with the one KV handler,
``kv_routes.kv``: the same parameters, checks, write, error form, metrics
and audit), only put on the wire here.

What is taken here, and only when all of it holds (else ``None``: the bytes
go to hypercorn untouched, which hands them to the same app):

- ``GET``, ``PUT`` or ``DELETE`` of ``/v1/kv/<key>``, HTTP/1.1, a ``Host`` header;
- a key and a query of printable ASCII without ``%`` (and no ``+`` in the
  query), so no unescaping question arises;
- query parameters among :data:`FAST_PARAMETERS` only: no blocking query
  (``?index=``: the core notices a client that leaves while it waits), no
  lock (``?acquire=``, ``?release=``), no ``?token=``;
- a token, if any, in ``X-Consul-Token`` or ``Authorization: Bearer`` (not
  ``?token=``), plain ASCII;
- a ``Content-Length`` body (none for GET and DELETE; at most ``MAX_BODY``
  for PUT), no ``Transfer-Encoding``, ``Expect`` or ``Upgrade`` header, and
  ``Connection`` only as ``keep-alive``.
"""

from __future__ import annotations

from email.utils import formatdate
from time import time
from typing import TYPE_CHECKING

from .request import MAX_BODY_BYTES, Headers, Request
from .router import Match

if TYPE_CHECKING:
    from .app import HttpApp

PREFIX = b"/v1/kv/"
MAX_BODY = MAX_BODY_BYTES  # larger goes the general way, to its 413
MAX_HEAD = 16384
_REASONLESS = {200: b"HTTP/1.1 200 \r\n", 400: b"HTTP/1.1 400 \r\n", 404: b"HTTP/1.1 404 \r\n"}
_METHODS = {b"GET": "GET", b"PUT": "PUT", b"DELETE": "DELETE"}
_KEY_BYTES = frozenset(range(0x21, 0x7F)) - {ord("%")}
_QUERY_BYTES = _KEY_BYTES - {ord("+")}  # "+" is a space in a query
# Plain reads, lists and writes; the rest (blocking, locks, ?token=, history) goes the general way.
FAST_PARAMETERS = frozenset({"dc", "raw", "keys", "recurse", "separator", "flags", "cas"})


def _secret(token: bytes | None, bearer: bytes | None) -> str | None | bool:
    """The request's secret as authz.token_from finds it; False if it is not plain ASCII (the app's case)."""
    for value, scheme in ((token, None), (bearer, b"bearer")):
        if not value:
            continue
        if scheme is not None:
            name, _, value = value.partition(b" ")
            if name.lower() != scheme or not value.strip(b" \t"):
                continue
            value = value.strip(b" \t")
        if not value.isascii():
            return False
        return value.decode()
    return None


class Incomplete(Exception):
    """More bytes are needed before the request can be judged.

    ``need`` is the whole request's size once its head is in (0 before): no
    use parsing again before the buffer holds that much.
    """

    def __init__(self, need: int = 0) -> None:
        super().__init__(need)
        self.need = need


class _Date:
    """The Date header, formatted once per second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode()
        return self.value


class KvFastPath:
    """Parses plain KV requests from the head of a connection's buffer and answers them through the app."""

    def __init__(self, app: HttpApp) -> None:
        self.app = app
        self._date = _Date()
        route = app.table.match("GET", "/v1/kv/key").route
        assert route is not None and route.endpoint == "kv.kv", "the KV route is the one this answers for"
        self._route = route

    def parse(self, buffer: bytes) -> tuple[bytes, bytes, bytes, bytes, int, str | None] | None:
        """``(method, key, query, body, consumed, token)`` of a request this answers, or ``None``.

        Raises:
            Incomplete: the request might qualify, but not all of it has arrived.
        """
        if not buffer.startswith((b"PUT /v1/kv/", b"GET /v1/kv/", b"DELETE /v1/kv/")):
            return None
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                return None
            raise Incomplete
        lines = buffer[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        method, target = parts[0], parts[1]
        path, _, query = target.partition(b"?")
        key = path[len(PREFIX):]
        if not key or not _KEY_BYTES.issuperset(key) or not _QUERY_BYTES.issuperset(query):
            return None
        length = None
        host = False
        token = bearer = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[0] in b" \t" or name[-1] in b" \t":
                return None
            name = name.lower()
            if name == b"content-length":
                value = value.strip(b" \t")
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name == b"host":
                host = True
            elif name == b"x-consul-token":
                if token is not None:
                    return None
                token = value.strip(b" \t")
            elif name == b"authorization":
                if bearer is not None:
                    return None
                bearer = value.strip(b" \t")
            elif name == b"connection":
                # HTTP/1.1 keeps the connection by default; python-requests (so
                # py-consul) still says so on every request. Anything else
                # (close, upgrade) is the core's.
                if value.strip(b" \t").lower() != b"keep-alive":
                    return None
            elif name in (b"transfer-encoding", b"expect", b"upgrade"):
                return None
        length = length or 0
        if not host or length > MAX_BODY or (method != b"PUT" and length):
            return None
        secret = _secret(token, bearer)
        if secret is False:
            return None
        start = end + 4
        if len(buffer) < start + length:
            raise Incomplete(start + length)
        return method, key, query, buffer[start:start + length], start + length, secret

    async def respond(
        self, method: bytes, key: bytes, query: bytes, body: bytes, token: str | None = None, source: str = ""
    ) -> bytes | None:
        """The app's response to a parsed request, as bytes; ``None`` when its query is not a plain one."""
        text_query = query.decode()
        if text_query:
            for item in text_query.split("&"):
                if item.partition("=")[0] not in FAST_PARAMETERS:
                    return None
        headers = Headers.of({"x-consul-token": token} if token else {})
        path = "/v1/kv/" + key.decode()
        request = Request(self.app, _METHODS[method], path, text_query, headers, source, body=body)
        response = await self.app.respond(request, Match(self._route, {"key": path[7:]}))
        if response.streamed:  # not a KV answer; never seen
            return None
        status = response.status_code
        return b"".join((
            _REASONLESS.get(status) or b"HTTP/1.1 %d \r\n" % status, response.head(),
            b"date: ", self._date(), b"\r\nserver: hypercorn-h11\r\n\r\n", response.body,
        ))

"""The plain Consul KV read and write, answered before hypercorn's protocol core.

Why. A durable ``PUT /v1/kv/<key>`` costs konsul ~200 µs of CPU; the HTTP stack
around it (h11 inside hypercorn's protocol core, an app task, quart's contexts
and werkzeug's routing) cost ~2,500 µs, and h11 alone, before any ASGI, ~300 µs
on the benchmark machine (docs/benchmarks.md, "HTTP KV"). So the two requests
that carry the load, a plain KV write and a plain KV read, are recognised in
the bytes and answered here; everything else, and anything unusual about these
two, goes on to hypercorn and the quart app as before.

What is answered here, and only when all of it holds (else ``None``: the bytes
go to hypercorn untouched, which then answers or refuses them as it always did):

- ``GET`` or ``PUT`` of ``/v1/kv/<key>``, HTTP/1.1, a ``Host`` header;
- a key of printable ASCII without ``%`` (so no unescaping question arises);
- a query that is empty, or only ``dc=<name>`` and, for GET, ``raw`` (so a
  lock's ``?acquire=``/``?release=`` always goes the general way; a plain
  PUT on a locked key is allowed and keeps the lock, as in Consul);
- a token, if any, in ``X-Consul-Token`` or ``Authorization: Bearer`` (not
  ``?token=``), checked here exactly as ``authz.py`` checks it for the app:
  principal, rate limits, ``key:read``/``key:write``, and the audit log;
- a ``Content-Length`` body (none for GET; at most ``MAX_BODY`` for PUT), no
  ``Transfer-Encoding``, ``Expect`` or ``Upgrade`` header, and ``Connection``
  only as ``keep-alive``.

The answers are the quart routes' answers byte for byte in status, headers and
body (``kv_routes``), the error form included, and count in
``konsul_http_requests`` as before.
"""

from __future__ import annotations

import json
import logging
from email.utils import formatdate
from time import time

from konsul.protocols.access import count_refusal
from konsul.sync.errors import KonsulError
from konsul.sync.limits import MAX_VALUE_BYTES

from .authz import resolve
from .context import HttpContext
from .kv_routes import entry_json
from .metrics import HttpMetrics
from .session_routes import lock_lookup

log = logging.getLogger(__name__)

PREFIX = b"/v1/kv/"
MAX_BODY = 2 * MAX_VALUE_BYTES  # the quart app's MAX_CONTENT_LENGTH; larger gets its 413
MAX_HEAD = 16384
_REASONLESS = {200: b"HTTP/1.1 200 \r\n", 400: b"HTTP/1.1 400 \r\n", 404: b"HTTP/1.1 404 \r\n"}
_ACCESS = {b"GET": "read", b"PUT": "write"}
_KEY_BYTES = frozenset(range(0x21, 0x7F)) - {ord("%")}
_DC_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


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
    """Parses and answers plain KV requests from the head of a connection's buffer."""

    def __init__(self, ctx: HttpContext, metrics: HttpMetrics) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self._date = _Date()
        self._counters: dict[tuple[str, int], object] = {}

    def parse(self, buffer: bytes) -> tuple[bytes, bytes, bytes, bytes, int, str | None] | None:
        """``(method, key, query, body, consumed, token)`` of a request this answers, or ``None``.

        Raises:
            Incomplete: the request might qualify, but not all of it has arrived.
        """
        if not buffer.startswith((b"PUT /v1/kv/", b"GET /v1/kv/")):
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
        if not key or not _KEY_BYTES.issuperset(key):
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
        if not host or length > MAX_BODY or (method == b"GET" and length):
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
        """The response to a parsed request, or ``None`` when its query is not a plain one."""
        dc, raw, seen_dc = None, False, False
        if query:
            for item in query.split(b"&"):
                name, eq, value = item.partition(b"=")
                if name == b"dc" and not seen_dc and _DC_BYTES.issuperset(value):
                    dc, seen_dc = value.decode() or None, True
                elif name == b"raw" and method == b"GET" and not value:
                    raw = True
                else:
                    return None
        ctx = self.ctx
        who = None
        try:
            who = resolve(ctx, token, source)
            if not who.authorizer.management:
                who.authorizer.require("key", key.decode(), _ACCESS[method])
            scope = ctx.scope(dc)
            if method == b"PUT":
                ok = await scope.kv_put(key.decode(), body)
                if ctx.audit is not None:
                    self._audit(who, source, method, key, "allowed")
                return self._response(method, 200, b"application/json", b"true" if ok else b"false")
            index = b"x-consul-index: %d\r\n" % max(1, scope.kv.last_index)
            entry = scope.kv.get(key.decode())
            if entry is None:
                return self._response(method, 404, b"application/json", b"", index)
            if raw:
                return self._response(method, 200, b"application/octet-stream", entry.value, index)
            locks = lock_lookup(ctx, scope)  # a locked key shows its Session, as the app's answer does
            payload = json.dumps([entry_json(entry, locks and locks(entry.key))], separators=(",", ":")).encode()
            return self._response(method, 200, b"application/json", payload, index)
        except KonsulError as error:
            payload = json.dumps({"error": error.code, "detail": str(error)}, separators=(",", ":")).encode()
            extra = b""
            if error.status in (401, 403, 429):
                if error.status != 429:
                    count_refusal(ctx.registry, "http", error.code)
                if ctx.audit is not None:
                    self._audit(who, source, method, key, "rate_limited" if error.status == 429 else "denied",
                                f"{error.code}: {error}")
                headers = getattr(error, "headers", None) or {}
                extra = b"".join(b"%s: %s\r\n" % (n.lower().encode(), v.encode()) for n, v in headers.items())
            return self._response(method, error.status, b"application/json", payload, extra)
        except Exception as error:  # the quart app's last-resort handler, same answer
            log.exception("unhandled error on %s /v1/kv/%s", method.decode(), key.decode())
            payload = json.dumps(
                {"error": "internal", "detail": f"unexpected server error: {error}"}, separators=(",", ":")
            ).encode()
            return self._response(method, 500, b"application/json", payload)

    def _audit(self, who, source: str, method: bytes, key: bytes, result: str, reason: str = "") -> None:
        self.ctx.audit.record(
            accessor=who.accessor_id if who is not None and who.token is not None else None,
            source=source, interface="http", operation="kv:" + _ACCESS[method], resource="/v1/kv/" + key.decode(),
            result=result, reason=reason,
        )

    def _response(self, method: bytes, status: int, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
        counter = self._counters.get((method, status))
        if counter is None:
            counter = self._counters[(method, status)] = self.metrics.requests.labels(method.decode(), str(status))
        counter.inc()
        start = _REASONLESS.get(status) or b"HTTP/1.1 %d \r\n" % status
        return b"".join((
            start, extra,
            b"content-type: ", content_type, b"\r\ncontent-length: %d\r\ndate: " % len(body),
            self._date(), b"\r\nserver: hypercorn-h11\r\n\r\n", body,
        ))

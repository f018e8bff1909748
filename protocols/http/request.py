"""The request a route handles: method, path, Consul's query arguments, headers, body.

Routes reach the request being handled through the module-level ``request``
(a context variable behind it: each request runs in its own trio task, and a
task's context is its own), as they did with quart, so a handler reads
``request.args.get("dc")`` or ``await request.get_data()`` and is passed only
what its route pattern names.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from konsul.sync.errors import KonsulError
from konsul.sync.limits import MAX_VALUE_BYTES

from ..admission import source_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from konsul.sync.acl_resolver import Principal

    from .context import HttpContext


# Bodies are read whole: a KV value is at most 512 KiB, a JSON body a bit more.
MAX_BODY_BYTES = 2 * MAX_VALUE_BYTES
BODY_TIMEOUT_S = 30.0  # from the head's arrival to the body's end


class BodyRefused(KonsulError):
    """A body that is too large (413) or too slow (408): the connection cannot carry another request."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.headers = {"Connection": "close"}


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


class QueryArgs:
    """A query string as Consul reads it: repeated names keep every value, a bare name is ``""``.

    ``get`` gives the first value (Go's ``url.Values.Get``), ``getlist`` all of
    them; ``name in args`` is how a flag such as ``?recurse`` is seen.
    """

    __slots__ = ("_values",)

    def __init__(self, query: str) -> None:
        values: dict[str, list[str]] = {}
        if query:
            for item in query.split("&"):
                if not item:
                    continue
                name, _, value = item.partition("=")
                name = unquote(name.replace("+", " "), errors="replace")
                value = unquote(value.replace("+", " "), errors="replace")
                found = values.get(name)
                if found is None:
                    values[name] = [value]
                else:
                    found.append(value)
        self._values = values

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self._values.get(name)
        return found[0] if found else default

    def getlist(self, name: str) -> list[str]:
        return list(self._values.get(name, ()))

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __getitem__(self, name: str) -> str:
        return self._values[name][0]

    def __iter__(self):
        return iter(self._values)

    def names(self) -> frozenset[str]:
        return frozenset(self._values)


class Headers:
    """Request headers, looked up without regard to case; repeated ones joined as HTTP says."""

    __slots__ = ("_values",)

    def __init__(self, raw: list[tuple[bytes, bytes]] | tuple = ()) -> None:
        values: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            values[key] = f"{values[key]}, {text}" if key in values else text
        self._values = values

    @classmethod
    def of(cls, values: dict[str, str]) -> Headers:
        """Headers from lower-case names to values (the KV fast path's, parsed already)."""
        headers = cls()
        headers._values = values
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]


class Request:
    """One HTTP request (or WebSocket handshake) and what was learned about it on the way in.

    Args:
        app: the application serving it (``create_app``).
        method: ``GET``, ``PUT``, ... (``WEBSOCKET`` for a handshake).
        path: the path, %-decoded.
        query: the query string, still escaped.
        headers: the raw header pairs.
        source: the client's address as admission and the audit log name it.
        scope: the ASGI scope (its ``extensions`` carry the TLS client certificate).
        receive: the ASGI receive callable, for the body; ``None`` when ``body`` is given.
        body: the whole body, when it was read before (the KV fast path).
    """

    __slots__ = (
        "app", "method", "path", "query", "headers", "source", "scope", "_receive", "_body", "_refused", "_args",
        "endpoint", "group", "view_args", "principal", "refusal",
    )

    def __init__(
        self, app: Any, method: str, path: str, query: str, headers: Headers, source: str,
        scope: dict[str, Any] | None = None, receive: Callable[[], Awaitable[dict]] | None = None,
        body: bytes | None = None,
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.source = source
        self.scope = scope or {}
        self._receive = receive
        self._body = body
        self._refused: BodyRefused | None = None
        self._args: QueryArgs | None = None
        self.endpoint: str | None = None  # "<routes>.<handler>", authz.py's key
        self.group: str | None = None  # the route group ("kv", "acl", ...)
        self.view_args: dict[str, str] = {}
        self.principal: Principal | None = None  # resolved once, by authz.principal()
        self.refusal = ""  # why a 401/403/429 was answered, for the audit log

    @classmethod
    def from_scope(cls, app: Any, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]]) -> Request:
        # UTF-8 as sent (clients %-escape, but need not); a query that is not
        # UTF-8 once decoded is refused before any handler (app.py).
        query = (scope.get("query_string") or b"").decode("utf-8", "replace")
        return cls(
            app, scope.get("method", "WEBSOCKET"), scope["path"], query,
            Headers(scope.get("headers") or ()), source_of(scope.get("client")), scope, receive,
        )

    @property
    def ctx(self) -> HttpContext:
        """The agent's state the routes serve (``HttpContext``)."""
        return self.app.ctx

    @property
    def args(self) -> QueryArgs:
        args = self._args
        if args is None:
            args = self._args = QueryArgs(self.query)
        return args

    @property
    def remote_addr(self) -> Any:
        return self.scope.get("client")

    async def get_data(self, cache: bool = True) -> bytes:
        """The whole body (read once; bounded in size and time by the app)."""
        if self._body is None:
            if self._refused is not None:
                raise self._refused  # answered once, in the error form
            try:
                self._body = await self.app.read_body(self)
            except BodyRefused as refused:
                self._refused = refused
                raise
        return self._body

    async def _next_body_message(self) -> dict:
        assert self._receive is not None
        return await self._receive()


_current: ContextVar[Request] = ContextVar("konsul_http_request")


def bind(current: Request):
    """Make ``current`` the request of this task; returns the token for :func:`unbind`."""
    return _current.set(current)


def unbind(token) -> None:
    _current.reset(token)


def current_request() -> Request:
    return _current.get()


class _RequestProxy:
    """``request``: the request of the task that reads it."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_current.get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_current.get(), name, value)

    def __bool__(self) -> bool:
        return _current.get(None) is not None


request: Request = _RequestProxy()  # type: ignore[assignment]

"""WebSocket routes over ASGI: accept, receive, send, close; a refusal before accepting is an HTTP answer.

A handler reads the connection through the module-level ``websocket`` (and
the handshake as ``request``: headers, address, TLS client certificate). The
first ``receive`` or ``send`` accepts the handshake; a ``KonsulError`` raised
before that is answered as the JSON error form with its status (a 401 for a
missing credential), through ASGI's ``websocket.http.response`` extension,
which hypercorn's core implements. The peer's disconnect cancels the handler,
so a handler is never left waiting on a connection that is gone; a handler
that returns closes the connection normally (1000), one that fails with 1011.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import trio

from konsul.sync.errors import KonsulError

from .request import Request, bind, unbind
from .responses import Response, error_response

if TYPE_CHECKING:
    from .app import HttpApp

log = logging.getLogger(__name__)

NORMAL_CLOSURE = 1000
INTERNAL_ERROR = 1011


class WebSocket:
    """One accepted (or about to be accepted) WebSocket connection."""

    def __init__(self, request: Request, send, inbox: trio.MemoryReceiveChannel) -> None:
        self.request = request
        self._send = send
        self._inbox = inbox
        self.accepted = False
        self.closed = False

    @property
    def headers(self):
        return self.request.headers

    @property
    def scope(self) -> dict[str, Any]:
        return self.request.scope

    @property
    def remote_addr(self) -> Any:
        return self.request.remote_addr

    async def accept(self) -> None:
        if not self.accepted:
            self.accepted = True
            await self._send({"type": "websocket.accept"})

    async def receive(self) -> bytes | str:
        """The next message: ``bytes`` for a binary frame, ``str`` for a text one."""
        await self.accept()
        return await self._inbox.receive()

    async def send(self, data: bytes | str) -> None:
        await self.accept()
        if isinstance(data, str):
            await self._send({"type": "websocket.send", "text": data})
        else:
            await self._send({"type": "websocket.send", "bytes": bytes(data)})

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def reject(self, response: Response) -> None:
        """Answer the handshake with ``response`` instead of opening the connection."""
        self.closed = True
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self._send({
                "type": "websocket.http.response.start", "status": response.status_code,
                "headers": response.header_pairs(),
            })
            body = response.body if not response.streamed else b""
            await self._send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await self._send({"type": "websocket.close", "code": 1008})


_current: ContextVar[WebSocket] = ContextVar("konsul_websocket")


class _WebSocketProxy:
    """``websocket``: the WebSocket of the task that reads it."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(_current.get(), name)


websocket: WebSocket = _WebSocketProxy()  # type: ignore[assignment]


async def serve_websocket(app: HttpApp, scope: dict[str, Any], receive, send) -> None:
    """Route a WebSocket handshake to its handler and run it until it returns or the peer leaves."""
    request = Request.from_scope(app, scope, receive)
    request.method = "WEBSOCKET"
    request._body = b""  # noqa: SLF001 - a handshake has no body
    if (await receive())["type"] != "websocket.connect":
        return
    inbox_in, inbox = trio.open_memory_channel(0)
    socket = WebSocket(request, send, inbox)
    match = app.table.match("WEBSOCKET", request.path)
    route = match.route
    token, socket_token = bind(request), _current.set(socket)
    try:
        if route is None:
            await _refuse(app, socket, error_response(
                400, "bad_request", f"{request.path} is an HTTP endpoint: send it a plain request, not a WebSocket "
                "handshake",
            ) if match.allowed else error_response(404, "unknown_endpoint", f"no such endpoint: {request.path}"))
            return
        request.endpoint, request.group, request.view_args = route.endpoint, route.group, match.args
        with trio.CancelScope() as handling:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, receive, inbox_in, handling)
                await _run(app, socket, route.handler, match.args)
                nursery.cancel_scope.cancel()
    finally:
        _current.reset(socket_token)
        unbind(token)


async def _run(app: HttpApp, socket: WebSocket, handler, args: dict[str, str]) -> None:
    try:
        await handler(**args)
    except KonsulError as error:
        if not socket.accepted:
            await _refuse(app, socket, app.error(socket.request, error))
            return
        await socket.close(INTERNAL_ERROR, error.code)
        return
    except Exception:
        log.exception("unhandled error on the WebSocket %s", socket.request.path)
        if not socket.accepted:
            await _refuse(app, socket, error_response(500, "internal", "unexpected server error"))
        else:
            await socket.close(INTERNAL_ERROR, "internal error")
        return
    if socket.accepted:
        await socket.close(NORMAL_CLOSURE)


async def _refuse(app: HttpApp, socket: WebSocket, response: Response) -> None:
    app.metrics.requests.labels("WEBSOCKET", str(response.status_code)).inc()
    await socket.reject(response)


async def _pump(receive, inbox: trio.MemorySendChannel, handling: trio.CancelScope) -> None:
    """Hands the peer's messages to the handler; its disconnect cancels the handler."""
    async with inbox:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                await inbox.send(data if data is not None else message.get("text") or "")
            elif kind == "websocket.disconnect":
                handling.cancel()
                return

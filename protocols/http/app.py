"""The HTTP application: an ASGI app of konsul's own around the routing table.

Theory of operation. hypercorn's protocol core (driven by server.py) turns
bytes into ASGI events; :class:`HttpApp` turns an ASGI request into a
:class:`Request`, and :meth:`HttpApp.respond` into a :class:`Response`, the
one way every request is answered: the body is read first (bounded in size
and time), then the token, rate limits and the route's permission are
checked (authz.py), then the handler runs; a ``KonsulError`` from any of
these is the JSON error form, anything else a logged 500. The KV fast path
(kv_fast_path.py) builds a ``Request`` from the bytes it parsed and calls the
same ``respond``, so a plain KV request is answered by the same handler,
checks and error form, without the ASGI round trip.

While a handler runs (a blocking query may wait minutes) the client's
disconnect cancels it, as the WebSocket's disconnect cancels its handler.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote_to_bytes

import trio

from konsul.protocols.access import count_refusal
from konsul.sync.errors import InvalidArgument, KonsulError

from . import authz
from .acl_routes import acl_api
from .agent_routes import agent_api
from .catalog_routes import catalog_api
from .context import HttpContext
from .device_routes import device_api
from .event_routes import event_api
from .kv_fast_path import KvFastPath
from .kv_routes import kv_api
from .metrics import ConnectionCollector, HttpMetrics, make_registry
from .ops_routes import ops_api
from .request import BODY_TIMEOUT_S, MAX_BODY_BYTES, BodyRefused, ClientGone, Request, bind, unbind
from .responses import Response, error_response
from .router import Match, RouteTable, Routes, allow_header
from .server import ConnectionAdmission
from .session_routes import session_api
from .snapshot_routes import snapshot_api
from .telemetry_routes import telemetry_api
from .twin_routes import twin_api
from .txn_routes import txn_api
from .ui_routes import ui_api
from .websocket import serve_websocket

log = logging.getLogger(__name__)

# Routes that read their body themselves, with a bound of their own: a snapshot
# upload streams to disk (snapshot_routes.py). Every other body is read whole,
# within the app-wide bound, before the route runs.
STREAMED_BODIES = frozenset({"snapshot.restore_snapshot"})

COUNTED_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})

ROUTES: tuple[Routes, ...] = (
    kv_api, txn_api, agent_api, catalog_api, device_api, twin_api, telemetry_api, ops_api, acl_api,
    session_api, snapshot_api, event_api,
    ui_api,  # the web console's static files, at /ui/
)


class HttpApp:
    """The ASGI application serving konsul's HTTP API (and, at the hub, the sync WebSocket).

    Args:
        ctx: the agent's state, as the routes see it.
        routes: every route group served.
        hub: the hub's own state (``konsul.hub.state.HubState``), for the hub's routes; None at an edge.
    """

    def __init__(self, ctx: HttpContext, routes: tuple[Routes, ...] | list[Routes], hub: Any = None) -> None:
        self.ctx = ctx
        self.hub = hub
        self.table = RouteTable(routes)
        self.max_body = MAX_BODY_BYTES
        self.body_timeout = BODY_TIMEOUT_S
        if ctx.registry is None:
            ctx.registry = make_registry(ctx.replica, lambda: ctx.sync_status())
        self.metrics = HttpMetrics(ctx.registry)
        self._counters: dict[tuple[str, int], Any] = {}  # konsul_http_requests' children, by method and status
        # Plain KV reads and writes are answered before hypercorn's protocol
        # core (server.py), by the same handler as below.
        self.fast_path = KvFastPath(self)
        # The server admits connections against the agent's limits (server.py).
        self.admission = ConnectionAdmission(ctx.limits)
        ctx.registry.register(ConnectionCollector(self.admission))

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._serve_http(scope, receive, send)
        elif kind == "websocket":
            await serve_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _serve_http(self, scope: dict[str, Any], receive, send) -> None:
        request = Request.from_scope(self, scope, receive)
        match = self.table.match(request.method, request.path)
        if match.route is not None and match.route.endpoint in STREAMED_BODIES:
            # The route reads its body itself, and sees the client leave as it reads.
            await _send_response(send, await self.respond(request, match))
            return
        try:
            # Every body is read before any handler can answer: hypercorn stalls a
            # keep-alive connection for its whole timeout when a response goes
            # out before the request body was consumed.
            await request.get_data()
        except ClientGone:
            return
        except BodyRefused:
            pass  # answered by respond(), which finds the refusal again
        with trio.CancelScope() as handling:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, handling)
                response = await self.respond(request, match)
                await _send_response(send, response)
                nursery.cancel_scope.cancel()

    async def respond(self, request: Request, match: Match | None = None) -> Response:
        """The answer to ``request``: routed (unless ``match`` is known), admitted, handled, errors in
        their JSON form; counted and audited."""
        token = bind(request)
        try:
            response = await self._dispatch(request, match or self.table.match(request.method, request.path))
            self._count(request.method, response.status_code)
            authz.audit_response(request, response)
        finally:
            unbind(token)
        return response

    def _count(self, method: str, status: int) -> None:
        if method not in COUNTED_METHODS:
            method = "other"  # a client may send any token as a method: not a label each
        counter = self._counters.get((method, status))
        if counter is None:
            counter = self._counters[(method, status)] = self.metrics.requests.labels(method, str(status))
        counter.inc()

    async def _dispatch(self, request: Request, match: Match) -> Response:
        route = match.route
        if route is not None:
            request.endpoint, request.group, request.view_args = route.endpoint, route.group, match.args
        try:
            if request.endpoint not in STREAMED_BODIES:
                await request.get_data()
            # After the body was read, so a refusal leaves the connection usable.
            authz.admit(request)
            _refuse_undecodable_target(request)
            if route is None:
                return self._unrouted(request, match.allowed)
            result = await route.handler(**match.args)
            return result
        except KonsulError as error:
            return self.error(request, error)
        except Exception as error:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal", f"unexpected server error: {error}")

    def _unrouted(self, request: Request, allowed: frozenset[str]) -> Response:
        if not allowed:
            # Not "not_found": a client must not read a wrong URL as a missing key
            # (a missing KV key is Consul's empty 404, kv_routes).
            return error_response(404, "unknown_endpoint", f"no such endpoint: {request.path}")
        if allowed == {"WEBSOCKET"}:
            return error_response(
                400, "bad_request", f"{request.path} is a WebSocket endpoint: open it with a WebSocket handshake"
            )
        if request.method == "OPTIONS":
            return Response(b"", 200, {"Allow": allow_header(allowed)})
        response = error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
        response.headers["Allow"] = allow_header(allowed)
        return response

    def error(self, request: Request, error: KonsulError) -> Response:
        """A ``KonsulError`` in the JSON error form; a refusal of who asked is counted and kept for the audit."""
        response = error_response(error.status, error.code, str(error))
        extra = getattr(error, "headers", None)  # RateLimited: Retry-After; BodyRefused: Connection: close
        if extra:
            response.headers.update(extra)
        if error.status in (401, 403, 429):
            request.refusal = f"{error.code}: {error}"
            if error.status != 429:  # rate limits count in konsul_rate_limited_total
                count_refusal(self.ctx.registry, "http", error.code)
        return response

    async def read_body(self, request: Request) -> bytes:
        """The whole body of ``request``, at most ``max_body`` bytes within ``body_timeout``.

        Raises:
            BodyRefused: too large (413; a declared length is refused before
                anything is read) or too slow (408).
            ClientGone: the client closed the connection first.
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body:
            raise self._too_large(request)
        chunks, size = [], 0
        with trio.move_on_after(self.body_timeout) as waiting:
            while True:
                message = await request._next_body_message()  # noqa: SLF001
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise self._too_large(request)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if waiting.cancelled_caught:
            raise BodyRefused(
                408, "request_timeout", f"the request body did not arrive in {self.body_timeout:.0f}s; send it whole"
            )
        return b"".join(chunks)

    def _too_large(self, request: Request) -> BodyRefused:
        return BodyRefused(413, "too_large", f"the body is larger than {self.max_body} bytes")


def _refuse_undecodable_target(request: Request) -> None:
    # hypercorn decodes %-escapes that are not UTF-8 to U+FFFD, so "bad%ffkey"
    # and "bad%fekey" would both name the key "bad\ufffdkey".
    scope = request.scope
    if not scope:
        return  # the fast path takes printable ASCII without "%" only
    try:
        unquote_to_bytes(scope.get("raw_path") or b"").decode("utf-8")
        unquote_to_bytes(scope.get("query_string") or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            "the path or query is not UTF-8 once %-decoded; escape each byte of a UTF-8 key"
        ) from None


async def _cancel_on_disconnect(receive, handling: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            handling.cancel()
            return


async def _send_response(send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.header_pairs()})
    body = response.body
    if not response.streamed:
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    try:
        async for chunk in body:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await body.aclose()


def create_app(ctx: HttpContext, extra_routes: tuple[Routes, ...] | list[Routes] = (), hub: Any = None) -> HttpApp:
    """The app serving ``ctx``: every route of konsul's API, and ``extra_routes`` (the hub's)."""
    return HttpApp(ctx, (*ROUTES, *extra_routes), hub=hub)

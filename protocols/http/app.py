"""The quart-trio application: routes, the error form, metrics."""

from __future__ import annotations

import logging
from urllib.parse import unquote_to_bytes

from quart import Response, g, has_request_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from konsul.sync.errors import InvalidArgument, KonsulError
from konsul.sync.limits import MAX_VALUE_BYTES

from konsul.protocols.access import count_refusal

from . import authz
from .acl_routes import acl_api
from .agent_routes import agent_api
from .catalog_routes import catalog_api
from .context import HttpContext
from .kv_fast_path import KvFastPath
from .kv_routes import kv_api
from .metrics import ConnectionCollector, HttpMetrics, make_registry
from .device_routes import device_api
from .event_routes import event_api
from .ops_routes import ops_api
from .session_routes import session_api
from .snapshot_routes import snapshot_api
from .telemetry_routes import telemetry_api
from .twin_routes import twin_api
from .txn_routes import txn_api
from .responses import error_response
from .server import ConnectionAdmission

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    # Not "not_found": a client must not read a wrong URL as a missing key
    # (a missing KV key is Consul's empty 404, kv_routes).
    404: "unknown_endpoint",
    405: "method_not_allowed",
    413: "too_large",
}


class AnyPath(PathConverter):
    """A path that may be empty or start with "/" (werkzeug's ``path`` may not)."""

    regex = "/?.*?"  # werkzeug anchors this regex itself


def create_app(ctx: HttpContext, extra_blueprints: tuple | list = ()) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["KONSUL"] = ctx
    # Bodies are read whole; a KV value is at most 512 KiB, a JSON body a bit more.
    app.config["MAX_CONTENT_LENGTH"] = 2 * MAX_VALUE_BYTES
    app.config["BODY_TIMEOUT"] = 30
    # Keys are judged by the store's rules, not normalised: "/v1/kv//x" must be
    # refused as a key with a leading "/", not redirected to "x".
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["anypath"] = AnyPath
    if ctx.registry is None:
        ctx.registry = make_registry(ctx.replica, lambda: ctx.sync_status())
    metrics = HttpMetrics(ctx.registry)
    # Plain KV reads and writes are answered before hypercorn's protocol core
    # (server.py); everything else reaches the routes below.
    app.config["KONSUL_FAST_PATH"] = KvFastPath(ctx, metrics)
    # The server admits connections against the agent's limits (server.py).
    admission = app.config["KONSUL_ADMISSION"] = ConnectionAdmission(ctx.limits)
    ctx.registry.register(ConnectionCollector(admission))
    blueprints = (kv_api, txn_api, agent_api, catalog_api, device_api, twin_api, telemetry_api, ops_api, acl_api,
                  session_api, snapshot_api)
    blueprints += (event_api,)
    for blueprint in (*blueprints, *extra_blueprints):
        app.register_blueprint(blueprint)

    @app.errorhandler(KonsulError)
    async def konsul_error(error: KonsulError) -> Response:
        response = error_response(error.status, error.code, str(error))
        extra = getattr(error, "headers", None)  # RateLimited: Retry-After
        if extra:
            response.headers.update(extra)
        if error.status in (401, 403, 429) and has_request_context():
            g.konsul_refusal = f"{error.code}: {error}"
            if error.status != 429:  # rate limits count in konsul_rate_limited_total
                count_refusal(ctx.registry, "http", error.code)
        return response

    def target() -> tuple[str, str]:
        # A WebSocket handshake to an HTTP route fails in a websocket context,
        # where quart's ``request`` is unbound (once a 500 and a traceback).
        if has_request_context():
            return request.method, request.path
        return "WEBSOCKET", websocket.path

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        method, path = target()
        detail = {
            404: f"no such endpoint: {path}",
            405: f"{method} is not allowed on {path}",
            413: f"the body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }.get(status, error.description or error.name)
        response = error_response(status, _HTTP_CODES.get(status, "http_error"), detail)
        if status == 413:
            # The body was not read: this connection cannot carry another request.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", *target())
        return error_response(500, "internal", f"unexpected server error: {error}")

    @app.before_request
    async def read_body_first() -> None:
        # Read every request body before any handler can answer. hypercorn
        # stalls a keep-alive connection for its whole timeout when a response
        # goes out before the request body was consumed (seen with an error
        # answered before a PUT's body was read). Handlers then get it cached.
        # A snapshot upload streams to disk with a bound of its own (snapshot_routes.py).
        if request.method in ("PUT", "POST", "PATCH", "DELETE") and request.endpoint != "snapshot.restore_snapshot":
            await request.get_data(cache=True)

    @app.before_request
    async def admit() -> None:
        # After the body was read (above), so a refusal leaves the connection usable.
        authz.admit(request.endpoint)

    @app.before_request
    async def refuse_undecodable_target() -> None:
        # werkzeug decodes %-escapes that are not UTF-8 to U+FFFD, so
        # "bad%ffkey" and "bad%fekey" would both name the key "bad\ufffdkey".
        raw_path = request.scope.get("raw_path") or b""
        try:
            unquote_to_bytes(raw_path).decode("utf-8")
            unquote_to_bytes(request.scope.get("query_string") or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                "the path or query is not UTF-8 once %-decoded; escape each byte of a UTF-8 key"
            ) from None

    @app.after_request
    async def count(response: Response) -> Response:
        metrics.requests.labels(request.method, str(response.status_code)).inc()
        authz.audit_response(response)
        return response

    @app.after_websocket
    async def count_websocket(response: Response | None) -> Response | None:
        if response is not None:
            metrics.requests.labels("WEBSOCKET", str(response.status_code)).inc()
        return response

    return app

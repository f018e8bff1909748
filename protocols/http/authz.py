"""Who may call which HTTP route: the token, the rate limits, the audit log.

Theory of operation. Every request (the KV fast path's too: it goes through
``HttpApp.respond`` like any other) passes :func:`admit` before its handler: the token is resolved to a principal (an unknown or revoked secret
is a 403 here), the client address and then the token are charged a request
(429 past the burst), and the route's permission is checked from
:data:`ROUTE_ACCESS` when it depends on the path alone. Routes whose answer
depends on the data (a list filtered to what the token may see, a recursive
delete, a transaction's operations) check in the handler with
:func:`authorizer` and are named in :data:`CHECKED_IN_ROUTE`. An endpoint in
neither table is refused to everyone but a management token, so a route
added without a thought for ACLs fails closed.

:func:`audit_response` then logs every write that succeeded and every
refusal (401, 403, 429) to the audit log, with the principal's AccessorID,
never its secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .request import Request, current_request, request

from konsul.sync.acl_resolver import Principal
from konsul.sync.acl_rules import Authorizer

from .context import HttpContext

if TYPE_CHECKING:
    from .responses import Response

# Needs no token at all: liveness probes, and what Consul answers to anyone.
OPEN = frozenset({
    "ops.live", "ops.ready", "catalog.status_leader", "catalog.status_peers",
    "catalog.catalog_datacenters", "acl.bootstrap",
    # The web console's static files: they hold no data (the page reads the API with its token).
    "ui.ui_root", "ui.ui_index", "ui.ui_asset",
})

# endpoint -> the permission it needs, from the request alone
ROUTE_ACCESS: dict[str, Callable[[HttpContext], tuple[str, str, str]]] = {
    "agent.self_info": lambda ctx: ("agent", ctx.node, "read"),
    "ops.metrics": lambda ctx: ("agent", ctx.node, "read"),
    "ops.sync_status": lambda ctx: ("operator", "", "read"),
    "hub_fleet.sites": lambda ctx: ("operator", "", "read"),
    "hub_fleet.site_credential": lambda ctx: ("operator", "", "write"),
    # User events (issue 17): event:write on the name to fire (list filters by event:read in the route).
    "event.fire": lambda ctx: ("event", request.view_args.get("name", ""), "write"),
}

# endpoints that call authorizer() themselves (their needs depend on the data)
CHECKED_IN_ROUTE = frozenset({
    "kv.kv", "txn.transaction",
    "agent.register", "agent.deregister", "agent.services", "agent.checks", "agent.report_check",
    "catalog.catalog_services", "catalog.catalog_service", "catalog.catalog_nodes",
    "catalog.health_service", "catalog.health_checks", "catalog.health_state",
    "devices.list_devices", "devices.device", "twin.twin_side", "twin.twin", "telemetry.device_telemetry",
    "telemetry.fleet_telemetry",
    # /v1/acl checks acl:read/acl:write itself; token/self needs only a valid token
    "acl.create_token", "acl.token_self", "acl.token", "acl.list_tokens", "acl.create_policy",
    "acl.policy", "acl.policy_by_name", "acl.list_policies",
    # sessions (Consul's session:write on the session's node to create, renew or
    # destroy it, session:read to see it; a lock's key:write is kv.kv's)
    "session.create_session", "session.destroy_session", "session.renew_session",
    "session.session_info", "session.node_sessions", "session.list_sessions",
})

# Checks, maintenance, members and the node-level catalog (docs/http-api.md, "Checks, nodes
# and filters"): as Consul, check writes need service:write on the check's service or
# node:write on the node; catalog register needs node:write (and service:write on its
# service); node reads need node:read, lists are filtered to what the token may read.
CHECKED_IN_ROUTE = CHECKED_IN_ROUTE | frozenset({
    "agent.register_check", "agent.deregister_check", "agent.update_check", "agent.service_maintenance",
    "agent.node_maintenance", "agent.members", "agent.service_definition",
    "catalog.catalog_register", "catalog.catalog_deregister", "catalog.catalog_node",
    "catalog.catalog_node_services", "catalog.health_node", "catalog.health_connect",
    # /v1/snapshot: a management token only, as in Consul (snapshot_routes.py)
    "snapshot.save_snapshot", "snapshot.restore_snapshot",
    # User events (issue 17): the list holds only events the token has event:read on.
    "event.list_events",
})

WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
_VERBS = {"GET": "read", "HEAD": "read", "DELETE": "delete"}  # other methods write
# route group -> what the audit log calls its resource
_AUDIT_KINDS = {"txn": "kv", "devices": "device", "twin": "device", "telemetry": "device", "hub_fleet": "operator",
                "ops": "operator"}
FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"


def token_from(header: Callable[[str], str | None], query_token: str | None) -> str | None:
    """A request's secret, in Consul's order: ``X-Consul-Token``, ``Authorization:
    Bearer``, then ``?token=``. ``header(name)`` reads a header (case-insensitive)."""
    token = header("X-Consul-Token")
    if token:
        return token.strip()
    scheme, _, value = (header("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query_token or None


def request_token(current: Request | None = None) -> str | None:
    """The secret of the request being handled."""
    current = current or current_request()
    return token_from(current.headers.get, current.args.get("token"))


def principal() -> Principal:
    """The principal of the request being handled (resolved once per request)."""
    current = current_request()
    found = current.principal
    if found is None:
        ctx: HttpContext = current.ctx
        # At the hub a site-local token is found in the site the request names.
        site = current.args.get("dc") if ctx.role == "hub" else None
        found = current.principal = resolve(ctx, request_token(current), current.source, site)
    return found


def authorizer() -> Authorizer:
    """What the request's token may do (raises a 403 for an unknown or revoked token)."""
    return principal().authorizer


def filtered(kept: int, offered: int, headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for a list answer: Consul's flag when ACLs hid some of it."""
    headers = dict(headers or {})
    if kept < offered:
        headers[FILTERED_HEADER] = "true"
    return headers


def resolve(ctx: HttpContext, secret: str | None, source: str, site: str | None = None) -> Principal:
    """Who a request is, within the rate limits; raises the refusal.

    The one order every door keeps (the app's routes, the KV fast path, the
    hub's sync handshake): the address is charged first, so a flood of
    made-up secrets from one address is limited like any other; then the
    secret is resolved; then its token is charged.
    """
    limits = ctx.rate_limits
    if limits is not None:
        refused = limits.check_source(source)
        if refused is not None:
            raise refused
    who = ctx.acl.principal(secret, site)
    if limits is not None and who.token is not None:
        refused = limits.check_token(who.accessor_id)
        if refused is not None:
            raise refused
    return who


def admit(current: Request) -> None:
    """Before a handler: token, rate limits and the route's own permission."""
    endpoint = current.endpoint
    ctx: HttpContext = current.ctx
    if endpoint is None:  # no route matched: the 404/405 answer needs no rights
        return
    if endpoint in OPEN:
        if ctx.rate_limits is not None:
            refused = ctx.rate_limits.check_source(current.source)
            if refused is not None:
                raise refused
        return
    who = principal()
    needed = ROUTE_ACCESS.get(endpoint)
    if needed is not None:
        who.authorizer.require(*needed(ctx))
    elif endpoint not in CHECKED_IN_ROUTE:
        who.authorizer.require("operator", "", "write")  # fail closed for a route nobody classified


def audit_response(current: Request, response: Response, interface: str = "http") -> None:
    """After a handler: log a successful write or any refusal."""
    ctx: HttpContext = current.ctx
    if ctx.audit is None:
        return
    status = response.status_code
    if status in (401, 403):
        result = "denied"
    elif status == 429:
        result = "rate_limited"
    elif current.method in WRITE_METHODS and status < 400:
        result = "allowed"
    else:
        return
    who = current.principal
    ctx.audit.record(
        accessor=who.accessor_id if who is not None and who.token is not None else None,
        source=current.source,
        interface=interface,
        operation=f"{_AUDIT_KINDS.get(current.group or '', current.group or 'http')}:"
        f"{_VERBS.get(current.method, 'write')}",
        resource=current.path,
        result=result,
        reason=current.refusal,
    )

"""``/v1/catalog``, ``/v1/health`` and ``/v1/status``: what runs where, and how well."""

from __future__ import annotations

from quart import Blueprint, Response, current_app, request

from konsul.sync.catalog import ServiceEntry
from konsul.sync.checks import CRITICAL, PASSING, STATES, CheckStatus
from konsul.sync.errors import InvalidArgument

from .agent_routes import check_json
from .authz import authorizer, filtered
from .blocking import block_until_changed, index_header
from .params import flag
from .responses import json_response

catalog_api = Blueprint("catalog", __name__)


def _scope(ctx):
    return ctx.scope(request.args.get("dc"))


async def _block_on_catalog(ctx, scope) -> dict[str, str]:
    """Blocking-query support for catalog and health reads; returns the index header."""
    def current() -> int:
        return scope.catalog.last_index + (ctx.checks.version if scope.name == ctx.site else 0)

    def event():
        # Health answers change with check status as well as with the catalog.
        return ctx.feed.event(scope.name, "catalog" if scope.name != ctx.site else "any")

    await block_until_changed(current, event)
    return index_header(current())


def _node_json(ctx, node: str, site: str) -> dict:
    address = ctx.advertise.rsplit(":", 1)[0] if node == ctx.node else ""
    return {
        "ID": ctx.replica.replica_id if node == ctx.node else "",
        "Node": node,
        "Address": address,
        "Datacenter": site,
        "TaggedAddresses": {"lan": address, "wan": address},
        "Meta": {},
    }


def _catalog_service_json(ctx, entry: ServiceEntry, site: str, index: int) -> dict:
    node = _node_json(ctx, entry.node, site)
    return {
        "ID": node["ID"],
        "Node": entry.node,
        "Address": node["Address"],
        "Datacenter": site,
        "TaggedAddresses": node["TaggedAddresses"],
        "NodeMeta": {},
        "ServiceID": entry.service_id,
        "ServiceName": entry.name,
        "ServiceTags": list(entry.tags),
        "ServiceAddress": entry.address,
        "ServicePort": entry.port,
        "ServiceMeta": dict(entry.meta),
        "ServiceEnableTagOverride": False,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _checks_of(ctx, scope, entry: ServiceEntry) -> list[CheckStatus]:
    """Check status of a service: live here, unknown (critical) for other nodes' services."""
    if scope.name == ctx.site and entry.node == ctx.node:
        ctx.checks.expire_ttls()
        return ctx.checks.for_service(entry.service_id)
    found = []
    for definition in entry.checks:
        reported = ctx.remote_check_status(scope.name, definition.check_id)
        status, output = reported or (CRITICAL, "status not known here: the agent is not connected")
        found.append(CheckStatus(definition, entry.service_id, entry.name, entry.tags, status, output))
    return found


def _visible(entries: list[ServiceEntry]) -> list[ServiceEntry]:
    """The instances the token may see: service:read on the name and node:read on the node (as Consul)."""
    allowed = authorizer()
    return [e for e in entries if allowed.allows("service", e.name, "read") and allowed.allows("node", e.node, "read")]


@catalog_api.route("/v1/catalog/services", methods=["GET"])
async def catalog_services() -> Response:
    ctx = current_app.config["KONSUL"]
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    found: dict[str, set[str]] = {}
    for entry in scope.catalog.services():
        found.setdefault(entry.name, set()).update(entry.tags)
    visible = authorizer().filter("service", found)
    body = {name: sorted(found[name]) for name in sorted(visible)}
    return json_response(body, headers=filtered(len(visible), len(found), headers))


@catalog_api.route("/v1/catalog/service/<name>", methods=["GET"])
async def catalog_service(name: str) -> Response:
    ctx = current_app.config["KONSUL"]
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    tags = request.args.getlist("tag")
    matching = [e for e in scope.catalog.services() if e.name == name and all(t in e.tags for t in tags)]
    visible = _visible(matching)
    body = [_catalog_service_json(ctx, e, scope.name, scope.catalog.last_index) for e in visible]
    return json_response(body, headers=filtered(len(visible), len(matching), headers))


@catalog_api.route("/v1/catalog/nodes", methods=["GET"])
async def catalog_nodes() -> Response:
    ctx = current_app.config["KONSUL"]
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    # Read after blocking: the answer must show the change that woke us.
    nodes = {e.node for e in scope.catalog.services()}
    if scope.name == ctx.site:
        nodes.add(ctx.node)
    visible = authorizer().filter("node", sorted(nodes))
    return json_response(
        [_node_json(ctx, n, scope.name) for n in visible], headers=filtered(len(visible), len(nodes), headers)
    )


@catalog_api.route("/v1/catalog/datacenters", methods=["GET"])
async def catalog_datacenters() -> Response:
    ctx = current_app.config["KONSUL"]
    names = set(ctx.replica.scopes) | {ctx.site}
    names.discard("global")
    return json_response(sorted(names))


@catalog_api.route("/v1/health/service/<name>", methods=["GET"])
async def health_service(name: str) -> Response:
    ctx = current_app.config["KONSUL"]
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    tags = request.args.getlist("tag")
    passing_only = flag("passing")
    body = []
    matching = [e for e in scope.catalog.services() if e.name == name and all(t in e.tags for t in tags)]
    visible = _visible(matching)
    headers = filtered(len(visible), len(matching), headers)
    for entry in visible:
        checks = _checks_of(ctx, scope, entry)
        if passing_only and any(c.status != PASSING for c in checks):
            continue
        body.append(
            {
                "Node": _node_json(ctx, entry.node, scope.name),
                "Service": {
                    "ID": entry.service_id,
                    "Service": entry.name,
                    "Tags": list(entry.tags),
                    "Address": entry.address,
                    "Port": entry.port,
                    "Meta": dict(entry.meta),
                },
                "Checks": [check_json(c, entry.node) for c in checks],
            }
        )
    return json_response(body, headers=headers)


@catalog_api.route("/v1/health/checks/<name>", methods=["GET"])
async def health_checks(name: str) -> Response:
    ctx = current_app.config["KONSUL"]
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    matching = [e for e in scope.catalog.services() if e.name == name]
    visible = _visible(matching)
    body = [
        check_json(c, e.node)
        for e in visible
        for c in _checks_of(ctx, scope, e)
        if not flag("passing") or c.status == PASSING
    ]
    return json_response(body, headers=filtered(len(visible), len(matching), headers))


@catalog_api.route("/v1/health/state/<state>", methods=["GET"])
async def health_state(state: str) -> Response:
    ctx = current_app.config["KONSUL"]
    if state != "any" and state not in STATES:
        raise InvalidArgument(f"state is one of any, {', '.join(STATES)}")
    scope = _scope(ctx)
    headers = await _block_on_catalog(ctx, scope)
    every = scope.catalog.services()
    visible = _visible(every)
    body = [
        check_json(c, e.node)
        for e in visible
        for c in _checks_of(ctx, scope, e)
        if state == "any" or c.status == state
    ]
    return json_response(body, headers=filtered(len(visible), len(every), headers))


@catalog_api.route("/v1/status/leader", methods=["GET"])
async def status_leader() -> Response:
    ctx = current_app.config["KONSUL"]
    return json_response(ctx.advertise)


@catalog_api.route("/v1/status/peers", methods=["GET"])
async def status_peers() -> Response:
    ctx = current_app.config["KONSUL"]
    return json_response([ctx.advertise])

"""``/v1/catalog``, ``/v1/health`` and ``/v1/status``: what runs where, and how well."""

from __future__ import annotations

from konsul.sync.catalog import NodeRecord, ServiceEntry
from konsul.sync.checks import CRITICAL, PASSING, STATES, CheckStatus
from konsul.sync.errors import InvalidArgument

from .agent_routes import check_json, service_addresses_json, service_json
from .agent_self import own_address
from .authz import authorizer, filtered
from .blocking import block_until_changed, index_header
from .filter_fields import CATALOG_SERVICE, CHECK, HEALTH_SERVICE, NODE, apply, request_filter
from .params import flag
from .request import request
from .responses import Response, json_response
from .router import Routes

catalog_api = Routes("catalog")


def _scope(ctx):
    return ctx.scope(request.args.get("dc"))


async def _block_on_catalog(ctx, scope) -> dict[str, str]:
    """Blocking-query support for catalog and health reads; returns the index header."""
    local = scope.name == ctx.site

    def current() -> int:
        # Health answers change with check status as well as with the catalog: the
        # status of this agent's checks, or (at the hub) what the site's edge reported.
        checks = ctx.checks.version if local else ctx.remote_checks_version(scope.name)
        return scope.catalog.last_index + checks

    def event():
        return ctx.feed.event(scope.name, "any")

    await block_until_changed(current, event)
    return index_header(current())


def _local(ctx, scope, node: str) -> bool:
    """Whether ``node`` is this agent's own node, whose check status is live here."""
    return scope.name == ctx.site and node == ctx.node


def node_records(scope) -> dict[str, NodeRecord]:
    return {record.node: record for record in scope.catalog.nodes()}


def node_names(ctx, scope, records: dict[str, NodeRecord]) -> set[str]:
    names = set(records) | {e.node for e in scope.catalog.services()}
    if scope.name == ctx.site:
        names.add(ctx.node)
    return names


def node_json(ctx, scope, node: str, records: dict[str, NodeRecord]) -> dict:
    record = records.get(node)
    own = _local(ctx, scope, node)
    address = record.address if record is not None and record.address else (own_address(ctx) if own else "")
    if record is not None:
        tagged = dict(record.tagged_addresses)
    else:
        tagged = {"lan": address, "wan": address} if address else {}
    return {
        "ID": ctx.replica.replica_id if own else "",
        "Node": node,
        "Address": address,
        "Datacenter": scope.name,
        "TaggedAddresses": tagged,
        "Meta": dict(record.meta) if record is not None else {},
    }


def catalog_service_json(ctx, scope, entry: ServiceEntry, records: dict[str, NodeRecord]) -> dict:
    node = node_json(ctx, scope, entry.node, records)
    index = scope.catalog.last_index
    return {
        "ID": node["ID"],
        "Node": entry.node,
        "Address": node["Address"],
        "Datacenter": scope.name,
        "TaggedAddresses": node["TaggedAddresses"],
        "NodeMeta": node["Meta"],
        "ServiceKind": entry.kind,
        "ServiceID": entry.service_id,
        "ServiceName": entry.name,
        "ServiceTags": list(entry.tags),
        "ServiceAddress": entry.address,
        "ServiceTaggedAddresses": service_addresses_json(entry),
        "ServicePort": entry.port,
        "ServiceMeta": dict(entry.meta),
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceEnableTagOverride": entry.enable_tag_override,
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _reported(ctx, scope, record: NodeRecord | None, definition, service_id, name, tags) -> CheckStatus:
    if record is not None and not record.agent:
        # A node registered through /v1/catalog/register: nobody runs its checks,
        # their status is the one registered (as Consul's catalog checks).
        status, output = definition.status or CRITICAL, definition.output
    else:
        reported = ctx.remote_check_status(scope.name, definition.check_id)
        status, output = reported or (CRITICAL, "status not known here: the agent is not connected")
    return CheckStatus(definition, service_id, name, tags, status, output)


def service_checks(ctx, scope, entry: ServiceEntry, records: dict[str, NodeRecord]) -> list[CheckStatus]:
    """Check status of a service: live here, as reported (or registered) for other nodes' services."""
    if _local(ctx, scope, entry.node):
        ctx.checks.expire_ttls()
        return ctx.checks.for_service(entry.service_id)
    record = records.get(entry.node)
    return [_reported(ctx, scope, record, d, entry.service_id, entry.name, entry.tags) for d in entry.checks]


def node_checks(ctx, scope, node: str, records: dict[str, NodeRecord]) -> list[CheckStatus]:
    """Node-level checks (serfHealth, node maintenance, the node's own)."""
    if _local(ctx, scope, node):
        ctx.checks.expire_ttls()
        return [c for c in ctx.checks.checks.values() if not c.service_id]
    record = records.get(node)
    if record is None:
        return []
    return [_reported(ctx, scope, record, d, "", "", ()) for d in record.checks]


def _visible(entries: list[ServiceEntry]) -> list[ServiceEntry]:
    """The instances the token may see: service:read on the name and node:read on the node (as Consul)."""
    allowed = authorizer()
    return [e for e in entries if allowed.allows("service", e.name, "read") and allowed.allows("node", e.node, "read")]


def node_meta_wanted() -> list[tuple[str, str]]:
    """``?node-meta=key:value`` (repeatable): every pair must be in the node's Meta."""
    wanted = []
    for pair in request.args.getlist("node-meta"):
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise InvalidArgument(f"node-meta={pair[:60]!r}: write key:value")
        wanted.append((key, value))
    return wanted


def _meta_matches(node: dict, wanted: list[tuple[str, str]]) -> bool:
    return all(node["Meta"].get(key) == value for key, value in wanted)


def near_order(ctx, nodes: list[str]) -> list[str]:
    """``?near=``: Consul sorts by network round trip from a node. Konsul has no
    coordinates, so the named node (``_agent``: this agent's) comes first and
    the rest keep their order."""
    near = request.args.get("near")
    if not near:
        return nodes
    first = ctx.node if near == "_agent" else near
    return sorted(nodes, key=lambda n: n != first)


def _instances(ctx, scope, name: str | None, records) -> list[ServiceEntry]:
    if request.args.get("peer"):
        return []  # Consul's cluster peering: Konsul has no peers, so a named one holds nothing
    tags = request.args.getlist("tag")
    meta = node_meta_wanted()
    found = [
        e for e in scope.catalog.services()
        if (name is None or e.name == name) and all(t in e.tags for t in tags)
        and (not meta or _meta_matches(node_json(ctx, scope, e.node, records), meta))
    ]
    order = {n: i for i, n in enumerate(near_order(ctx, sorted({e.node for e in found})))}
    return sorted(found, key=lambda e: order[e.node]) if request.args.get("near") else found


@catalog_api.route("/v1/catalog/services", methods=["GET"])
async def catalog_services() -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    wanted = request_filter(CATALOG_SERVICE)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    found: dict[str, set[str]] = {}
    for entry in _instances(ctx, scope, None, records):
        if wanted is None or wanted(catalog_service_json(ctx, scope, entry, records)):
            found.setdefault(entry.name, set()).update(entry.tags)
    visible = authorizer().filter("service", found)
    body = {name: sorted(found[name]) for name in sorted(visible)}
    return json_response(body, headers=filtered(len(visible), len(found), headers))


@catalog_api.route("/v1/catalog/service/<name>", methods=["GET"])
async def catalog_service(name: str) -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    wanted = request_filter(CATALOG_SERVICE)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    matching = _instances(ctx, scope, name, records)
    visible = _visible(matching)
    body = apply(wanted, [catalog_service_json(ctx, scope, e, records) for e in visible])
    return json_response(body, headers=filtered(len(visible), len(matching), headers))


@catalog_api.route("/v1/catalog/nodes", methods=["GET"])
async def catalog_nodes() -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    wanted = request_filter(NODE)
    headers = await _block_on_catalog(ctx, scope)
    # Read after blocking: the answer must show the change that woke us.
    records = node_records(scope)
    nodes = node_names(ctx, scope, records)
    visible = authorizer().filter("node", sorted(nodes))
    meta = node_meta_wanted()
    body = [node_json(ctx, scope, n, records) for n in near_order(ctx, visible)]
    body = apply(wanted, [n for n in body if _meta_matches(n, meta)])
    return json_response(body, headers=filtered(len(visible), len(nodes), headers))


@catalog_api.route("/v1/catalog/datacenters", methods=["GET"])
async def catalog_datacenters() -> Response:
    ctx = request.ctx
    names = set(ctx.replica.scopes) | {ctx.site}
    names.discard("global")
    return json_response(sorted(names))


def health_entry(ctx, scope, entry: ServiceEntry, records) -> tuple[dict, list[CheckStatus]]:
    checks = service_checks(ctx, scope, entry, records) + node_checks(ctx, scope, entry.node, records)
    return {
        "Node": node_json(ctx, scope, entry.node, records),
        "Service": service_json(entry, scope.name),
        "Checks": [check_json(c, entry.node) for c in checks],
    }, checks


@catalog_api.route("/v1/health/service/<name>", methods=["GET"])
async def health_service(name: str) -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    wanted = request_filter(HEALTH_SERVICE)
    passing_only = flag("passing")
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    matching = _instances(ctx, scope, name, records)
    visible = _visible(matching)
    headers = filtered(len(visible), len(matching), headers)
    body = []
    for entry in visible:
        answer, checks = health_entry(ctx, scope, entry, records)
        # A node's checks count for every service on it, as in Consul.
        if passing_only and any(c.status != PASSING for c in checks):
            continue
        body.append(answer)
    return json_response(apply(wanted, body), headers=headers)


@catalog_api.route("/v1/health/connect/<name>", methods=["GET"])
@catalog_api.route("/v1/health/ingress/<name>", methods=["GET"])
async def health_connect(name: str) -> Response:
    """Connect-capable instances and ingress gateways: Konsul runs no service mesh, so none.

    Answered (not a 404) so that clients which ask keep working; the filter is
    still checked, as Consul would.
    """
    ctx = request.ctx
    scope = _scope(ctx)
    request_filter(HEALTH_SERVICE)
    headers = await _block_on_catalog(ctx, scope)
    return json_response([], headers=headers)


def _readable_checks(ctx, scope, records, entries: list[ServiceEntry], with_nodes: bool) -> list[dict]:
    allowed = authorizer()
    found = [check_json(c, e.node) for e in entries for c in service_checks(ctx, scope, e, records)]
    if with_nodes:
        meta = node_meta_wanted()
        for node in near_order(ctx, sorted(node_names(ctx, scope, records))):
            if allowed.allows("node", node, "read") and _meta_matches(node_json(ctx, scope, node, records), meta):
                found.extend(check_json(c, node) for c in node_checks(ctx, scope, node, records))
    return found


@catalog_api.route("/v1/health/checks/<name>", methods=["GET"])
async def health_checks(name: str) -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    wanted = request_filter(CHECK)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    matching = _instances(ctx, scope, name, records)
    visible = _visible(matching)
    body = [c for c in _readable_checks(ctx, scope, records, visible, False)
            if not flag("passing") or c["Status"] == PASSING]
    return json_response(apply(wanted, body), headers=filtered(len(visible), len(matching), headers))


@catalog_api.route("/v1/health/state/<state>", methods=["GET"])
async def health_state(state: str) -> Response:
    ctx = request.ctx
    if state != "any" and state not in STATES:
        raise InvalidArgument(f"state is one of any, {', '.join(STATES)}")
    scope = _scope(ctx)
    wanted = request_filter(CHECK)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    every = _instances(ctx, scope, None, records)
    visible = _visible(every)
    body = [c for c in _readable_checks(ctx, scope, records, visible, True) if state == "any" or c["Status"] == state]
    return json_response(apply(wanted, body), headers=filtered(len(visible), len(every), headers))


@catalog_api.route("/v1/status/leader", methods=["GET"])
async def status_leader() -> Response:
    ctx = request.ctx
    return json_response(ctx.advertise)


@catalog_api.route("/v1/status/peers", methods=["GET"])
async def status_peers() -> Response:
    ctx = request.ctx
    return json_response([ctx.advertise])


# Node-level catalog routes (register, node, node-services, health/node) live in their own module.
from . import node_routes  # noqa: E402,F401 - registers its routes on catalog_api

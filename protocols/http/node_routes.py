"""``/v1/catalog/register|deregister``, ``/v1/catalog/node[-services]/<n>``, ``/v1/health/node/<n>``.

Consul's low-level catalog: nodes and services that no agent runs (a PLC, a
database appliance, a device gateway), with checks whose status is the one
registered. They are written to the scope's replicated catalog, so they reach
the hub (and, registered at the hub with ``?dc=<site>``, the site's edge).

Registering on this agent's own node is the same as registering through
``/v1/agent``: the service and its checks are this agent's. The agent's own
node record (address, ``serfHealth``) is never removed through here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from konsul.sync.catalog import CheckDefinition, NodeRecord, ServiceEntry
from konsul.sync.checks import CRITICAL, NODE_HEALTH_ID, STATES, agent_node_record
from konsul.sync.errors import InvalidArgument, NotFound

from .agent_routes import _field, _fields, json_body, parse_service, service_json
from .agent_self import own_address
from .authz import authorizer
from .request import request
from .responses import Response
from .catalog_routes import (
    _block_on_catalog, _local, catalog_api, check_json, node_checks, node_json, node_meta_wanted, node_records,
    service_checks,
)
from .filter_fields import AGENT_SERVICE, CHECK, apply, request_filter
from .responses import json_response


def _scope_of(ctx, fields: dict):
    return ctx.scope(request.args.get("dc") or _field(fields, "Datacenter", str, "") or None)


def _string_map(value, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgument(f"{name} is a map of strings")
    return dict(value)


def _catalog_check(raw, node: str) -> tuple[CheckDefinition, str]:
    """A catalog check (static: its status is the one given) and its ServiceID."""
    if not isinstance(raw, dict):
        raise InvalidArgument("a check must be a JSON object")
    fields = _fields(raw)
    if _field(fields, "Node", str, node) != node:
        raise InvalidArgument("a check's Node must be the Node being registered")
    name = _field(fields, "Name", str, "")
    check_id = _field(fields, "CheckID", str, "") or name
    if not check_id:
        raise InvalidArgument("a check needs a CheckID or a Name")
    status = _field(fields, "Status", str, "") or CRITICAL
    if status not in STATES:
        raise InvalidArgument(f"a check's Status is one of {', '.join(STATES)}")
    definition = CheckDefinition(
        check_id, name or check_id, "static", notes=_field(fields, "Notes", str, ""), status=status,
        output=_field(fields, "Output", str, ""),
    )
    return definition, _field(fields, "ServiceID", str, "")


def _merge(checks: tuple[CheckDefinition, ...], new: list[CheckDefinition]) -> tuple[CheckDefinition, ...]:
    ids = {c.check_id for c in new}
    return (*(c for c in checks if c.check_id not in ids), *new)


@catalog_api.route("/v1/catalog/register", methods=["PUT"])
async def catalog_register() -> Response:
    ctx = request.ctx
    fields = _fields(await json_body())
    scope = _scope_of(ctx, fields)
    node = _field(fields, "Node", str, "")
    if not node or "/" in node:
        raise InvalidArgument("Node is required (a name without '/')")
    authorizer().require("node", node, "write")
    own = _local(ctx, scope, node)
    existing = scope.catalog.node(node)
    address = _field(fields, "Address", str, "")
    if not address and existing is None and not own:
        raise InvalidArgument("Address is required for a new node")

    service = None
    if isinstance(fields.get("service"), dict):
        body = dict(fields["service"])
        body_fields = _fields(body)
        if "service" in body_fields and "name" not in body_fields:
            body["Name"] = body_fields["service"]  # the catalog names it Service, the agent Name
        body.pop("Checks", None), body.pop("checks", None), body.pop("Check", None), body.pop("check", None)
        service, _ = parse_service(body, node)
        authorizer().require("service", service.name, "write")
        before = scope.catalog.get(node, service.service_id)
        service = dataclasses.replace(service, checks=before.checks if before is not None else ())
    elif fields.get("service") is not None:
        raise InvalidArgument("Service must be a JSON object")

    raw_checks = ([fields["check"]] if fields.get("check") else []) + _field(fields, "Checks", list, [])
    node_level, by_service = [], {}
    for raw in raw_checks:
        definition, service_id = _catalog_check(raw, node)
        if definition.check_id == NODE_HEALTH_ID:
            raise InvalidArgument(f"{NODE_HEALTH_ID} is the agents' own liveness check")
        (by_service.setdefault(service_id, []) if service_id else node_level).append(definition)
    for service_id, checks in by_service.items():
        if service is None:
            service = scope.catalog.get(node, service_id)
            if service is None:
                raise InvalidArgument(f"a check names ServiceID {service_id!r}, which is not registered on {node!r}")
            authorizer().require("service", service.name, "write")
        if service.service_id != service_id:
            raise InvalidArgument("the checks of one request may name one service only: the one registered with them")
        service = dataclasses.replace(service, checks=_merge(service.checks, checks), stamp=None)

    if own:
        record = agent_node_record(ctx.node, address or own_address(ctx), existing)
    else:
        record = existing or NodeRecord(node, agent=False)
        record = dataclasses.replace(record, address=address or record.address, stamp=None)
    meta = fields.get("nodemeta")
    if meta is None and request.args.getlist("node-meta"):
        meta = dict(node_meta_wanted())  # py-consul sends a register's node_meta as ?node-meta=
    if meta is not None:
        record = dataclasses.replace(record, meta=_string_map(meta, "NodeMeta"))
    if fields.get("taggedaddresses") is not None:
        record = dataclasses.replace(record, tagged_addresses=_string_map(fields["taggedaddresses"], "TaggedAddresses"))
    record = dataclasses.replace(record, checks=_merge(record.checks, node_level))

    stored = await scope.register_node(record, service)
    if own:
        ctx.checks.sync_node(stored)
        if service is not None:
            ctx.checks.sync_service(scope.catalog.get(node, service.service_id))
        ctx.on_service_change()
    return json_response(True)


@catalog_api.route("/v1/catalog/deregister", methods=["PUT"])
async def catalog_deregister() -> Response:
    ctx = request.ctx
    fields = _fields(await json_body())
    scope = _scope_of(ctx, fields)
    node = _field(fields, "Node", str, "")
    if not node:
        raise InvalidArgument("Node is required")
    authorizer().require("node", node, "write")
    own = _local(ctx, scope, node)
    service_id = _field(fields, "ServiceID", str, "")
    check_id = _field(fields, "CheckID", str, "")
    if check_id == NODE_HEALTH_ID:
        raise InvalidArgument(f"{NODE_HEALTH_ID} is the agent's own liveness check; it cannot be deregistered")
    if service_id:
        entry = scope.catalog.get(node, service_id)
        if entry is None:
            raise NotFound(f"no service {service_id!r} is registered on node {node!r}")
        authorizer().require("service", entry.name, "write")
        if check_id:
            kept = tuple(c for c in entry.checks if c.check_id != check_id)
            if kept == entry.checks:
                raise NotFound(f"service {service_id!r} has no check {check_id!r}")
            stored = await scope.register_service(dataclasses.replace(entry, checks=kept, stamp=None))
            if own:
                ctx.checks.sync_service(stored)
        else:
            await scope.deregister_service(node, service_id)
            if own:
                ctx.checks.drop_service(service_id)
    elif check_id:
        record = scope.catalog.node(node)
        kept = tuple(c for c in (record.checks if record else ()) if c.check_id != check_id)
        if record is None or kept == record.checks:
            raise NotFound(f"node {node!r} has no node check {check_id!r}")
        stored = await scope.register_node(dataclasses.replace(record, checks=kept, stamp=None))
        if own:
            ctx.checks.sync_node(stored)
    else:
        if own:
            raise InvalidArgument(
                f"{node!r} is this agent's own node; deregister its services (ServiceID) or checks (CheckID) instead"
            )
        for entry in scope.catalog.services():
            if entry.node == node:
                authorizer().require("service", entry.name, "write")
        await scope.deregister_node(node)
    if own:
        ctx.on_service_change()
    return json_response(True)


def _readable_node(ctx, scope, node: str, records, headers: dict[str, str]) -> None:
    names = set(records) | {e.node for e in scope.catalog.services()}
    if _local(ctx, scope, node):
        names.add(node)
    if node not in names or not authorizer().allows("node", node, "read"):
        missing = NotFound(f"no node {node!r} in the catalog of {scope.name!r}")
        missing.headers = headers  # the index, for a client that blocks until the node appears
        raise missing


def _services_on(scope, node: str) -> list[ServiceEntry]:
    allowed = authorizer()
    return [e for e in scope.catalog.services() if e.node == node and allowed.allows("service", e.name, "read")]


@catalog_api.route("/v1/catalog/node/<node>", methods=["GET"])
async def catalog_node(node: str) -> Response:
    node_body, services, wanted, headers = await _node_and_services(node)
    by_id = {service["ID"]: service for service in services if wanted is None or wanted(service)}
    return json_response({"Node": node_body, "Services": by_id}, headers=headers)


@catalog_api.route("/v1/catalog/node-services/<node>", methods=["GET"])
async def catalog_node_services(node: str) -> Response:
    node_body, services, wanted, headers = await _node_and_services(node)
    return json_response({"Node": node_body, "Services": apply(wanted, services)}, headers=headers)


async def _node_and_services(node: str) -> tuple[dict, list[dict], Any, dict]:
    """A readable node's record, its services as JSON, the request's filter and the answer's headers."""
    ctx = request.ctx
    scope = ctx.scope(request.args.get("dc"))
    wanted = request_filter(AGENT_SERVICE)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    _readable_node(ctx, scope, node, records, headers)
    services = [service_json(e, scope.name) for e in _services_on(scope, node)]
    return node_json(ctx, scope, node, records), services, wanted, headers


@catalog_api.route("/v1/health/node/<node>", methods=["GET"])
async def health_node(node: str) -> Response:
    ctx = request.ctx
    scope = ctx.scope(request.args.get("dc"))
    wanted = request_filter(CHECK)
    headers = await _block_on_catalog(ctx, scope)
    records = node_records(scope)
    if not authorizer().allows("node", node, "read"):
        return json_response([], headers=headers)
    body = [check_json(c, node) for c in node_checks(ctx, scope, node, records)]
    for entry in _services_on(scope, node):
        body.extend(check_json(c, node) for c in service_checks(ctx, scope, entry, records))
    return json_response(apply(wanted, body), headers=headers)

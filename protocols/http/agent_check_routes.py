"""``/v1/agent/check/*`` and maintenance mode: checks of this agent, Consul style.

A check belongs to a service (``ServiceID``) or to the node. Its definition
is stored with its owner in the replicated catalog (the service entry or the
agent's node record), so it survives a restart and reaches the hub; its
status lives in the agent's CheckTable (DESIGN.md, decision 5).

Maintenance mode is a static critical check (``_service_maintenance:<id>``,
``_node_maintenance``), as in Consul: it takes the service (or every service
of the node) out of ``?passing`` answers and DNS until it is disabled.
"""

from __future__ import annotations

import dataclasses

from konsul.sync.catalog import CheckDefinition
from konsul.sync.checks import CRITICAL, NODE_HEALTH_ID, STATES, agent_node_record
from konsul.sync.errors import InvalidArgument, NotFound

from .agent_routes import _field, _fields, agent_api, json_body, parse_check, require_check_write
from .agent_self import own_address
from .authz import authorizer
from .request import request
from .responses import Response

NODE_MAINTENANCE_ID = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
_DEFAULT_REASON = "Maintenance mode is enabled for this {what}, but no reason was provided. This is a default message."


def _scope(ctx):
    if ctx.role != "edge":
        raise InvalidArgument("checks run at an edge: register them with the edge agent of the site")
    return ctx.replica.scope(ctx.site)


def parse_agent_check(body: dict) -> tuple[CheckDefinition, str, str | None]:
    """A check register body: the definition, its ServiceID ("" for a node check), its initial Status."""
    fields = _fields(body)
    name = _field(fields, "Name", str, "")
    if not name:
        raise InvalidArgument("a check needs a Name")
    service_id = _field(fields, "ServiceID", str, "")
    definition = parse_check(body, service_id or name, 0)
    check_id = _field(fields, "CheckID", str, "") or _field(fields, "ID", str, "") or name
    if check_id == NODE_HEALTH_ID or check_id.startswith(("_node_maintenance", SERVICE_MAINTENANCE_PREFIX)):
        raise InvalidArgument(f"the check ID {check_id!r} is the agent's own; choose another")
    status = _field(fields, "Status", str, "") or None
    if status is not None and status not in STATES:
        raise InvalidArgument(f"Status is one of {', '.join(STATES)}")
    return dataclasses.replace(definition, check_id=check_id, name=name), service_id, status


async def put_node_checks(ctx, scope, checks: tuple[CheckDefinition, ...]) -> None:
    record = agent_node_record(ctx.node, own_address(ctx), scope.catalog.node(ctx.node))
    record = dataclasses.replace(record, checks=(record.checks[0], *checks))  # the liveness check stays first
    stored = await scope.register_node(record)
    ctx.checks.sync_node(stored)
    ctx.on_service_change()


async def put_service_checks(ctx, scope, entry, checks: tuple[CheckDefinition, ...]) -> None:
    stored = await scope.register_service(dataclasses.replace(entry, checks=checks, stamp=None))
    ctx.checks.sync_service(stored)
    ctx.on_service_change()


def _own_node_checks(record) -> tuple[CheckDefinition, ...]:
    """The node checks the user registered (not the agent's liveness check)."""
    return tuple(c for c in (record.checks if record is not None else ()) if c.check_id != NODE_HEALTH_ID)


def _owner(ctx, scope, check_id: str):
    """The service entry a check belongs to, or None for a node check; NotFound if no one has it."""
    for entry in scope.catalog.services():
        if entry.node == ctx.node and any(c.check_id == check_id for c in entry.checks):
            return entry
    record = scope.catalog.node(ctx.node)
    if record is not None and any(c.check_id == check_id for c in record.checks):
        return None
    raise NotFound(f"no check {check_id!r} is registered with this agent")


async def _remove_check(ctx, scope, check_id: str) -> None:
    owner = _owner(ctx, scope, check_id)
    if owner is None:
        record = scope.catalog.node(ctx.node)
        await put_node_checks(ctx, scope, tuple(c for c in _own_node_checks(record) if c.check_id != check_id))
    else:
        await put_service_checks(ctx, scope, owner, tuple(c for c in owner.checks if c.check_id != check_id))


@agent_api.route("/v1/agent/check/register", methods=["PUT"])
async def register_check() -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    definition, service_id, status = parse_agent_check(await json_body())
    entry = None
    if service_id:
        entry = scope.catalog.get(ctx.node, service_id)
        if entry is None:
            raise NotFound(f"no service {service_id!r} is registered with this agent; register it first")
        authorizer().require("service", entry.name, "write")
    else:
        authorizer().require("node", ctx.node, "write")
    if definition.check_id in ctx.checks.checks:
        # Registering an existing ID replaces that check, wherever it was.
        require_check_write(ctx, definition.check_id)
        if ctx.checks.checks[definition.check_id].service_id != service_id:
            await _remove_check(ctx, scope, definition.check_id)
            entry = scope.catalog.get(ctx.node, service_id) if service_id else None
    if entry is not None:
        kept = tuple(c for c in entry.checks if c.check_id != definition.check_id)
        await put_service_checks(ctx, scope, entry, (*kept, definition))
    else:
        record = scope.catalog.node(ctx.node)
        kept = tuple(c for c in (_own_node_checks(record)) if c.check_id != definition.check_id)
        await put_node_checks(ctx, scope, (*kept, definition))
    if status is not None:
        ctx.checks.report(definition.check_id, status)
    return Response(b"", status=200)


@agent_api.route("/v1/agent/check/deregister/<check_id>", methods=["PUT"])
async def deregister_check(check_id: str) -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    require_check_write(ctx, check_id)
    if check_id == NODE_HEALTH_ID:
        raise InvalidArgument(f"{NODE_HEALTH_ID} is the agent's own liveness check; it cannot be deregistered")
    await _remove_check(ctx, scope, check_id)
    return Response(b"", status=200)


@agent_api.route("/v1/agent/check/update/<check_id>", methods=["PUT"])
async def update_check(check_id: str) -> Response:
    ctx = request.ctx
    fields = _fields(await json_body())
    status = _field(fields, "Status", str, "")
    if status not in STATES:
        raise InvalidArgument(f"Status is one of {', '.join(STATES)}")
    require_check_write(ctx, check_id)
    refuse_static(ctx, check_id)
    ctx.checks.report(check_id, status, _field(fields, "Output", str, ""))
    return Response(b"", status=200)


def refuse_static(ctx, check_id: str) -> None:
    check = ctx.checks.checks.get(check_id)
    if check is not None and check.definition.kind == "static":
        raise InvalidArgument(
            f"{check_id!r} is not a TTL check: its status is the agent's (liveness, maintenance mode)"
        )


def _enable_flag() -> bool:
    raw = request.args.get("enable")
    if raw is None or raw.lower() not in ("true", "false", "1", "0"):
        raise InvalidArgument("enable=true or enable=false is required")
    return raw.lower() in ("true", "1")


def _maintenance_check(check_id: str, name: str, what: str) -> CheckDefinition:
    reason = request.args.get("reason") or _DEFAULT_REASON.format(what=what)
    return CheckDefinition(check_id, name, "static", notes=reason, status=CRITICAL)


@agent_api.route("/v1/agent/service/maintenance/<service_id>", methods=["PUT"])
async def service_maintenance(service_id: str) -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    enable = _enable_flag()
    entry = scope.catalog.get(ctx.node, service_id)
    if entry is None:
        authorizer().require_subtree("service", "", "write")
        raise NotFound(f"no service {service_id!r} is registered with this agent")
    authorizer().require("service", entry.name, "write")
    check_id = SERVICE_MAINTENANCE_PREFIX + service_id
    kept = tuple(c for c in entry.checks if c.check_id != check_id)
    if enable:
        kept = (*kept, _maintenance_check(check_id, "Service Maintenance Mode", "service"))
    if kept != entry.checks:
        await put_service_checks(ctx, scope, entry, kept)
    return Response(b"", status=200)


@agent_api.route("/v1/agent/maintenance", methods=["PUT"])
async def node_maintenance() -> Response:
    ctx = request.ctx
    scope = _scope(ctx)
    enable = _enable_flag()
    authorizer().require("node", ctx.node, "write")
    record = scope.catalog.node(ctx.node)
    current = _own_node_checks(record)
    kept = tuple(c for c in current if c.check_id != NODE_MAINTENANCE_ID)
    if enable:
        kept = (*kept, _maintenance_check(NODE_MAINTENANCE_ID, "Node Maintenance Mode", "node"))
    if kept != current or record is None:
        await put_node_checks(ctx, scope, kept)
    return Response(b"", status=200)

"""``/v1/agent``: services and checks of this agent, Consul style."""

from __future__ import annotations

from konsul.sync.catalog import CheckDefinition, ServiceEntry
from konsul.sync.checks import CRITICAL, NODE_HEALTH_ID, PASSING, STATES, WARNING, CheckStatus
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.limits import parse_json_document

from .authz import authorizer, filtered
from .filter_fields import AGENT_SERVICE, CHECK, MEMBER, apply, request_filter
from .params import flag, parse_duration
from .request import request
from .responses import Response, json_response
from .router import Routes

agent_api = Routes("agent")

_KNOWN_CHECK_KINDS = ("TTL", "HTTP", "TCP")
_UNSUPPORTED_CHECK_KINDS = (
    "Script", "Args", "GRPC", "DockerContainerID", "Shell", "H2PING", "UDP", "OSService", "AliasService"
)


def _fields(body: dict) -> dict:
    """Field names as Consul reads them: case-insensitive, snake_case accepted.

    Consul decodes JSON case-insensitively, and clients rely on it (py-consul
    sends ``{"name": ..., "checks": [{"ttl": "10s"}]}``).
    """
    return {k.lower().replace("_", ""): v for k, v in body.items()}


async def json_body_any():
    """The request body as a JSON document, or a 400 that says where it broke.

    Every JSON body follows the one rule set of sync/limits.py (depth, size,
    items, finite numbers, UTF-8): what is refused here can never reach the
    store, a peer or a reader that would choke on it later.
    """
    raw = await request.get_data(cache=True)
    return parse_json_document(raw, "the body")


async def json_body() -> dict:
    body = await json_body_any()
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type, default):
    value = body.get(name.lower(), default)
    if value is None:
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(f"{name} must be a {kind.__name__}")
    return value


def parse_check(body: dict, service_id: str, position: int, numbered: bool = False) -> CheckDefinition:
    """One check of a service; ``numbered``: the service has several, named ``service:<id>:<n>`` (as Consul)."""
    if not isinstance(body, dict):
        raise InvalidArgument("a check must be a JSON object")
    body = _fields(body)
    kinds = [k for k in _KNOWN_CHECK_KINDS if body.get(k.lower())]
    unsupported = [k for k in _UNSUPPORTED_CHECK_KINDS if body.get(k.lower())]
    if unsupported or not kinds:
        named = ", ".join(unsupported) or "none"
        raise InvalidArgument(
            f"unknown check type ({named}); a check needs exactly one of TTL, HTTP or TCP"
        )
    if len(kinds) > 1:
        raise InvalidArgument(f"a check has one type, this one has {', '.join(kinds)}")
    kind = kinds[0]
    default_id = f"service:{service_id}" + (f":{position + 1}" if numbered else "")
    check_id = _field(body, "CheckID", str, "") or _field(body, "ID", str, "") or default_id
    after = body.get("deregistercriticalserviceafter")
    definition = CheckDefinition(
        check_id=check_id,
        name=_field(body, "Name", str, "") or f"Service '{service_id}' check",
        kind=kind.lower(),
        target="" if kind == "TTL" else _field(body, kind, str, ""),
        interval_s=parse_duration(_field(body, "Interval", str, "10s"), "Interval"),
        timeout_s=parse_duration(_field(body, "Timeout", str, "10s"), "Timeout"),
        ttl_s=parse_duration(str(body["ttl"]), "TTL") if kind == "TTL" else 0.0,
        deregister_after_s=None if after in (None, "") else parse_duration(str(after), "DeregisterCriticalServiceAfter"),
        notes=_field(body, "Notes", str, ""),
    )
    if kind != "TTL" and definition.interval_s <= 0:
        raise InvalidArgument(f"{kind} checks need a positive Interval")
    return definition


def parse_service(body: dict, node: str) -> tuple[ServiceEntry, dict[str, str]]:
    """A ServiceEntry from a register body, and the checks' requested initial status."""
    body = _fields(body)
    name = _field(body, "Name", str, "")
    if not name:
        raise InvalidArgument("a service needs a Name")
    service_id = _field(body, "ID", str, "") or name
    tags = _field(body, "Tags", list, [])
    meta = _field(body, "Meta", dict, {})
    if not all(isinstance(t, str) for t in tags) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise InvalidArgument("Tags is a list of strings and Meta a map of strings")
    raw_checks = []
    if body.get("check"):
        raw_checks.append(body["check"])
    checks_field = _field(body, "Checks", list, [])
    raw_checks.extend(checks_field)
    checks = tuple(parse_check(c, service_id, i, len(raw_checks) > 1) for i, c in enumerate(raw_checks))
    initial = {}
    for definition, raw in zip(checks, raw_checks, strict=True):
        status = _fields(raw).get("status")
        if status:
            if status not in STATES:
                raise InvalidArgument(f"check Status is one of {', '.join(STATES)}")
            initial[definition.check_id] = status
    entry = ServiceEntry(
        node=node,
        service_id=service_id,
        name=name,
        address=_field(body, "Address", str, ""),
        port=_field(body, "Port", int, 0),
        tags=tuple(tags),
        meta=dict(meta),
        checks=checks,
        enable_tag_override=_field(body, "EnableTagOverride", bool, False),
        tagged_addresses=parse_service_addresses(_field(body, "TaggedAddresses", dict, {})),
        kind=_field(body, "Kind", str, ""),
    )
    return entry, initial


def parse_service_addresses(raw: dict) -> dict[str, tuple[str, int]]:
    """Consul's service ``TaggedAddresses``: ``{"lan": {"Address": ..., "Port": ...}}``."""
    found = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise InvalidArgument('TaggedAddresses maps a name to {"Address": ..., "Port": ...}')
        value = _fields(value)
        port = _field(value, "Port", int, 0)
        if not 0 <= port <= 65535:
            raise InvalidArgument("a tagged address's Port is between 0 and 65535")
        found[name] = (_field(value, "Address", str, ""), port)
    return found


def service_json(entry: ServiceEntry, site: str) -> dict:
    return {
        "ID": entry.service_id,
        "Service": entry.name,
        "Tags": list(entry.tags),
        "Meta": dict(entry.meta),
        "Port": entry.port,
        "Address": entry.address,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": entry.enable_tag_override,
        "TaggedAddresses": service_addresses_json(entry),
        "Kind": entry.kind,
        "Datacenter": site,
    }


def service_addresses_json(entry: ServiceEntry) -> dict:
    return {name: {"Address": address, "Port": port} for name, (address, port) in entry.tagged_addresses.items()}


def check_json(check: CheckStatus, node: str) -> dict:
    definition = check.definition
    return {
        "Node": node,
        "CheckID": definition.check_id,
        "Name": definition.name,
        "Status": check.status,
        "Notes": definition.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(check.service_tags),
        "Type": "" if definition.kind == "static" else definition.kind,
        "Interval": f"{definition.interval_s:g}s" if definition.kind in ("http", "tcp") else "",
        "Timeout": f"{definition.timeout_s:g}s" if definition.kind in ("http", "tcp") else "",
    }


@agent_api.route("/v1/agent/service/register", methods=["PUT"])
async def register() -> Response:
    ctx = request.ctx
    entry, initial = parse_service(await json_body(), ctx.node)
    authorizer().require("service", entry.name, "write")
    scope = ctx.replica.scope(ctx.site)
    stored = await scope.register_service(entry)
    ctx.checks.sync_service(stored)
    for check_id, status in initial.items():
        ctx.checks.report(check_id, status)
    ctx.on_service_change()
    return Response(b"", status=200)


@agent_api.route("/v1/agent/service/deregister/<service_id>", methods=["PUT"])
async def deregister(service_id: str) -> Response:
    ctx = request.ctx
    scope = ctx.replica.scope(ctx.site)
    entry = scope.catalog.get(ctx.node, service_id)
    if entry is None:
        # Nothing to name a service permission after; only a token that may
        # write every service learns whether an unknown ID exists.
        authorizer().require_subtree("service", "", "write")
    else:
        authorizer().require("service", entry.name, "write")
    await scope.deregister_service(ctx.node, service_id)
    ctx.checks.drop_service(service_id)
    ctx.on_service_change()
    return Response(b"", status=200)


@agent_api.route("/v1/agent/services", methods=["GET"])
async def services() -> Response:
    ctx = request.ctx
    catalog = ctx.replica.scope(ctx.site).catalog
    allowed = authorizer()
    wanted = request_filter(AGENT_SERVICE)
    mine = [e for e in catalog.services() if e.node == ctx.node]
    visible = [e for e in mine if allowed.allows("service", e.name, "read")]
    body = {e.service_id: service_json(e, ctx.site) for e in visible}
    if wanted is not None:
        body = {k: v for k, v in body.items() if wanted(v)}
    return json_response(body, headers=filtered(len(visible), len(mine)))


@agent_api.route("/v1/agent/service/<service_id>", methods=["GET"])
async def service_definition(service_id: str) -> Response:
    """One service of this agent (Consul's ``/v1/agent/service/<id>``); 404 unless readable."""
    ctx = request.ctx
    entry = ctx.replica.scope(ctx.site).catalog.get(ctx.node, service_id)
    if entry is None or not authorizer().allows("service", entry.name, "read"):
        raise NotFound(f"no service {service_id!r} is registered with this agent")
    return json_response(service_json(entry, ctx.site))


@agent_api.route("/v1/agent/checks", methods=["GET"])
async def checks() -> Response:
    ctx = request.ctx
    wanted = request_filter(CHECK)
    ctx.checks.expire_ttls()
    # serfHealth is the catalog's view of this agent, not a check registered with it (as in Consul).
    every = {k: c for k, c in ctx.checks.checks.items() if k != NODE_HEALTH_ID}
    visible = {k: c for k, c in every.items() if may_read_check(c, ctx.node)}
    body = {k: check_json(c, ctx.node) for k, c in visible.items()}
    if wanted is not None:
        body = {k: v for k, v in body.items() if wanted(v)}
    return json_response(body, headers=filtered(len(visible), len(every)))


def may_read_check(check: CheckStatus, node: str) -> bool:
    """A service's check needs service:read on it, a node's check node:read (as Consul)."""
    allowed = authorizer()
    if check.service_id:
        return allowed.allows("service", check.service_name, "read")
    return allowed.allows("node", node, "read")


@agent_api.route("/v1/agent/check/<verb>/<check_id>", methods=["PUT"])
async def report_check(verb: str, check_id: str) -> Response:
    ctx = request.ctx
    status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}.get(verb)
    if status is None:
        raise NotFound(f"no check verb {verb!r}; use pass, warn or fail")
    require_check_write(ctx, check_id)
    agent_check_routes.refuse_static(ctx, check_id)
    ctx.checks.report(check_id, status, request.args.get("note", ""))
    return Response(b"", status=200)


def require_check_write(ctx, check_id: str) -> None:
    check = ctx.checks.checks.get(check_id)
    if check is None:
        authorizer().require_subtree("service", "", "write")  # as for deregister: no name to check
    elif check.service_id:
        authorizer().require("service", check.service_name, "write")
    else:
        authorizer().require("node", ctx.node, "write")


@agent_api.route("/v1/agent/self", methods=["GET"])
async def self_info() -> Response:
    ctx = request.ctx
    return json_response(agent_self(ctx))


@agent_api.route("/v1/agent/members", methods=["GET"])
async def members() -> Response:
    ctx = request.ctx
    wanted = request_filter(MEMBER)
    every = agent_members(ctx, wan=flag("wan"))
    visible = [m for m in every if authorizer().allows("node", m["Name"], "read")]
    return json_response(apply(wanted, visible), headers=filtered(len(visible), len(every)))


# The agent's own description and the check endpoints live in their own modules.
from .agent_self import agent_members, agent_self  # noqa: E402
from . import agent_check_routes  # noqa: E402,F401 - registers /v1/agent/check/* and maintenance on agent_api

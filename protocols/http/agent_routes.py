"""``/v1/agent``: services and checks of this agent, Consul style."""

from __future__ import annotations

from quart import Blueprint, Response, current_app, request

from konsul.sync.catalog import CheckDefinition, ServiceEntry
from konsul.sync.checks import CRITICAL, PASSING, STATES, WARNING, CheckStatus
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.limits import parse_json_document

from .authz import authorizer, filtered
from .params import parse_duration
from .responses import json_response

agent_api = Blueprint("agent", __name__)

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


def parse_check(body: dict, service_id: str, position: int) -> CheckDefinition:
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
    default_id = f"service:{service_id}" + (f":{position + 1}" if position else "")
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
    checks = tuple(parse_check(c, service_id, i) for i, c in enumerate(raw_checks))
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
    )
    return entry, initial


def service_json(entry: ServiceEntry, site: str) -> dict:
    return {
        "ID": entry.service_id,
        "Service": entry.name,
        "Tags": list(entry.tags),
        "Meta": dict(entry.meta),
        "Port": entry.port,
        "Address": entry.address,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Datacenter": site,
    }


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
        "Type": definition.kind,
        "Interval": f"{definition.interval_s:g}s" if definition.kind != "ttl" else "",
        "Timeout": f"{definition.timeout_s:g}s" if definition.kind != "ttl" else "",
    }


@agent_api.route("/v1/agent/service/register", methods=["PUT"])
async def register() -> Response:
    ctx = current_app.config["KONSUL"]
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
    ctx = current_app.config["KONSUL"]
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
    ctx = current_app.config["KONSUL"]
    catalog = ctx.replica.scope(ctx.site).catalog
    allowed = authorizer()
    mine = [e for e in catalog.services() if e.node == ctx.node]
    visible = [e for e in mine if allowed.allows("service", e.name, "read")]
    body = {e.service_id: service_json(e, ctx.site) for e in visible}
    return json_response(body, headers=filtered(len(visible), len(mine)))


@agent_api.route("/v1/agent/checks", methods=["GET"])
async def checks() -> Response:
    ctx = current_app.config["KONSUL"]
    ctx.checks.expire_ttls()
    allowed = authorizer()
    every = ctx.checks.checks
    visible = {k: c for k, c in every.items() if allowed.allows("service", c.service_name, "read")}
    return json_response(
        {k: check_json(c, ctx.node) for k, c in visible.items()}, headers=filtered(len(visible), len(every))
    )


@agent_api.route("/v1/agent/check/<verb>/<check_id>", methods=["PUT"])
async def report_check(verb: str, check_id: str) -> Response:
    ctx = current_app.config["KONSUL"]
    status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}.get(verb)
    if status is None:
        raise NotFound(f"no check verb {verb!r}; use pass, warn or fail")
    check = ctx.checks.checks.get(check_id)
    if check is None:
        authorizer().require_subtree("service", "", "write")  # as for deregister: no name to check
    else:
        authorizer().require("service", check.service_name, "write")
    ctx.checks.report(check_id, status, request.args.get("note", ""))
    return Response(b"", status=200)


@agent_api.route("/v1/agent/self", methods=["GET"])
async def self_info() -> Response:
    ctx = current_app.config["KONSUL"]
    host = ctx.advertise.rsplit(":", 1)[0]
    return json_response(
        {
            "Config": {
                "Datacenter": ctx.site,
                "NodeName": ctx.node,
                "NodeID": ctx.replica.replica_id,
                "Server": ctx.role == "hub",
                "Version": "konsul-0.1.0",
            },
            "Member": {"Name": ctx.node, "Addr": host, "Port": 0, "Status": 1, "Tags": {"dc": ctx.site, "role": ctx.role}},
            "Meta": {},
        }
    )

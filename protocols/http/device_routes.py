"""``/v1/devices``: the device registry (records durable, presence ephemeral)."""

from __future__ import annotations

import time

from quart import Blueprint, Response, current_app, request

from konsul.sync.devices import DEFAULT_KV_READ, DeviceRecord, Presence, check_device_id
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.replica import GLOBAL_SCOPE
from konsul.sync.scope import Scope

from .agent_routes import _fields, json_body
from .params import flag
from .responses import json_response

device_api = Blueprint("devices", __name__)


def listed_scopes(ctx, dc: str | None, sites_only: bool = False) -> list[Scope]:
    """The scopes a device listing covers: ``?dc``'s, or at the hub without one
    (or with ``?dc=global``) every scope (with ``sites_only``, every site's)."""
    if ctx.role == "hub" and dc in (None, GLOBAL_SCOPE):
        return [scope for name, scope in sorted(ctx.replica.scopes.items()) if not (sites_only and name == GLOBAL_SCOPE)]
    return [ctx.scope(dc)]


def records_matching(scope: Scope, kind: str | None, tags: list[str]) -> list[DeviceRecord]:
    """The scope's device records of type ``kind`` (any if None) carrying every tag in ``tags``."""
    return [r for r in scope.devices.records() if (kind is None or r.type == kind) and all(t in r.tags for t in tags)]


def registered_device_scope(device_id: str) -> Scope:
    """The request's scope (``?dc``), once ``device_id`` is known to be registered there."""
    scope = current_app.config["KONSUL"].scope(request.args.get("dc"))
    require_registered(scope, device_id)
    return scope


def require_registered(scope: Scope, device_id: str) -> DeviceRecord:
    """The device's record in ``scope``; a 404 that says how to register it if there is none."""
    record = scope.devices.get(check_device_id(device_id))
    if record is None:
        raise NotFound(f"no device {device_id!r} is registered in {scope.name!r}; create it with PUT /v1/devices/{device_id}")
    return record


def device_json(record: DeviceRecord, presence: Presence, site: str) -> dict:
    return {
        "ID": record.device_id,
        "Type": record.type,
        "Site": site,
        "Tags": list(record.tags),
        "Attributes": record.attributes,
        "Firmware": record.firmware,
        "KVRead": list(record.kv_read),
        "KVWrite": list(record.kv_write),
        "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created_ms / 1000)),
        "Online": presence.online,
        "LastSeen": None if presence.last_seen is None
        else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(presence.last_seen)),
        "Protocol": presence.protocol or None,
        "Address": presence.address or None,
    }


def _strings(body: dict, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = body.get(name.lower())
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{name} is a list of strings")
    return tuple(value)


def parse_device(device_id: str, body: dict, existing: DeviceRecord | None) -> DeviceRecord:
    body = _fields(body)
    base = existing or DeviceRecord(device_id)
    attributes = body.get("attributes", base.attributes)
    if not isinstance(attributes, dict):
        raise InvalidArgument("Attributes is a JSON object")
    for name in ("type", "firmware"):
        if name in body and not isinstance(body[name], str):
            raise InvalidArgument(f"{name.capitalize()} is a string")
    return DeviceRecord(
        device_id=check_device_id(device_id),
        type=body.get("type", base.type),
        tags=_strings(body, "Tags", base.tags),
        attributes=attributes,
        firmware=body.get("firmware", base.firmware),
        kv_read=_strings(body, "KVRead", base.kv_read if existing else DEFAULT_KV_READ),
        kv_write=_strings(body, "KVWrite", base.kv_write),
    )


@device_api.route("/v1/devices", methods=["GET"])
async def list_devices() -> Response:
    """One site's devices; at the hub, ``?dc=global`` lists every site's (the fleet)."""
    ctx = current_app.config["KONSUL"]
    tags = request.args.getlist("tag")
    kind = request.args.get("type")
    online = request.args.get("online")
    found = []
    for scope in listed_scopes(ctx, request.args.get("dc")):
        for record in records_matching(scope, kind, tags):
            presence = ctx.device_presence(scope.name, record.device_id)
            if online is not None and presence.online != (online.lower() in ("1", "true", "yes", "")):
                continue
            found.append(device_json(record, presence, scope.name))
    return json_response(found)


@device_api.route("/v1/devices/<device_id>", methods=["GET", "PUT", "DELETE"])
async def device(device_id: str) -> Response:
    ctx = current_app.config["KONSUL"]
    scope = ctx.scope(request.args.get("dc"))
    if request.method == "DELETE":
        await scope.delete_device(device_id)
        return json_response(True)
    if request.method == "PUT":
        existing = scope.devices.get(device_id)
        record = parse_device(device_id, await json_body(), existing)
        stored, token = await scope.put_device(record, new_token=flag("rotate-token"))
        body = device_json(stored, ctx.device_presence(scope.name, device_id), scope.name)
        if token is not None:
            body["Token"] = token  # shown once; only its hash is stored
        return json_response(body, status=201 if existing is None else 200)
    record = scope.devices.get(check_device_id(device_id))
    if record is None:
        raise NotFound(f"no device {device_id!r} is registered in {scope.name!r}")
    return json_response(device_json(record, ctx.device_presence(scope.name, device_id), scope.name))

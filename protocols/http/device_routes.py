"""``/v1/devices``: the device registry (records durable, presence ephemeral).

Access (docs/acl.md, "Devices as principals"): reading a device needs
``device:read`` on it, creating, changing, deleting it or rotating its token
``device:write``; lists show only the devices the token may read (Consul's
list filtering). A device's rights are rights the caller gives away, so
granting a device ``KVRead``/``KVWrite`` prefixes needs the caller to hold
``key:read``/``key:write`` on all of each prefix, and linking ``Policies``
needs ``acl:write``; otherwise anyone allowed to write one device could give
it write access to all KV.

``PUT /v1/devices/<id>?oscore=true`` (``device:write``, as a token rotation)
also makes the device a new OSCORE security context (RFC 8613) and returns it
once, as the device uses it, under ``OSCORE``: the master secret stays on the
edge that serves the device (protocols/oscore_contexts.py), the record names
only the context's Sender ID, and asking again replaces the context.
"""

from __future__ import annotations

import time
from dataclasses import replace

from konsul.sync.acl import MANAGEMENT_POLICY_ID, MANAGEMENT_POLICY_NAME, check_uuid
from konsul.sync.acl_rules import Authorizer, PermissionDenied, check_pattern
from konsul.sync.devices import DEFAULT_KV_READ, DeviceRecord, Presence, check_device_id
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.replica import GLOBAL_SCOPE
from konsul.sync.scope import Scope

from .agent_routes import _fields, json_body
from .authz import authorizer as request_authorizer
from .params import flag
from .request import request
from .responses import Response, json_response
from .router import Routes

device_api = Routes("devices")


def listed_scopes(ctx, dc: str | None, sites_only: bool = False) -> list[Scope]:
    """The scopes a device listing covers: ``?dc``'s, or at the hub without one
    (or with ``?dc=global``) every scope (with ``sites_only``, every site's)."""
    if ctx.role == "hub" and dc in (None, GLOBAL_SCOPE):
        return [scope for name, scope in sorted(ctx.replica.scopes.items()) if not (sites_only and name == GLOBAL_SCOPE)]
    return [ctx.scope(dc)]


def records_matching(scope: Scope, kind: str | None, tags: list[str]) -> list[DeviceRecord]:
    """The scope's device records of type ``kind`` (any if None) carrying every tag in ``tags``."""
    return [r for r in scope.devices.records() if (kind is None or r.type == kind) and all(t in r.tags for t in tags)]


def registered_device_scope(device_id: str, access: str = "read") -> Scope:
    """The request's scope (``?dc``), once the token may ``access`` ``device_id`` and it is registered there."""
    request_authorizer().require("device", check_device_id(device_id), access)
    scope = request.ctx.scope(request.args.get("dc"))
    require_registered(scope, device_id)
    return scope


def readable(records: list[DeviceRecord]) -> list[DeviceRecord]:
    """The records whose devices the request's token may read (lists are filtered, not refused)."""
    authorizer = request_authorizer()
    if authorizer.management:
        return records
    allowed = set(authorizer.filter("device", [r.device_id for r in records], "read"))
    return [r for r in records if r.device_id in allowed]


def require_registered(scope: Scope, device_id: str) -> DeviceRecord:
    """The device's record in ``scope``; a 404 that says how to register it if there is none."""
    record = scope.devices.get(check_device_id(device_id))
    if record is None:
        raise NotFound(f"no device {device_id!r} is registered in {scope.name!r}; create it with PUT /v1/devices/{device_id}")
    return record


def policy_links(ctx, policy_ids: tuple[str, ...]) -> list[dict]:
    """A device's policies as Consul shows a token's: ``{"ID", "Name"}``, deleted ones left out."""
    links = []
    for policy_id in policy_ids:
        if policy_id == MANAGEMENT_POLICY_ID:
            links.append({"ID": policy_id, "Name": MANAGEMENT_POLICY_NAME})
            continue
        policy = ctx.acl.policy(policy_id) if ctx.acl is not None else None
        if policy is not None:
            links.append({"ID": policy.policy_id, "Name": policy.name})
    return links


def device_json(record: DeviceRecord, presence: Presence, site: str, policies: list[dict] | None = None) -> dict:
    """A device as the API shows it; ``policies`` its resolved policy links (default: the IDs alone)."""
    return {
        "ID": record.device_id,
        "Type": record.type,
        "Site": site,
        "Tags": list(record.tags),
        "Attributes": record.attributes,
        "Firmware": record.firmware,
        "KVRead": list(record.kv_read),
        "KVWrite": list(record.kv_write),
        "Policies": policies if policies is not None else [{"ID": p} for p in record.policy_ids],
        "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created_ms / 1000)),
        "Online": presence.online,
        "LastSeen": None if presence.last_seen is None
        else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(presence.last_seen)),
        "Protocol": presence.protocol or None,
        "Address": presence.address or None,
        # The device's OSCORE context, by its IDs only (the secret is shown once, when made).
        "OSCORE": {"SenderID": record.oscore_id} if record.oscore_id else None,
    }


def _strings(body: dict, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = body.get(name.lower())
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{name} is a list of strings")
    return tuple(value)


def parse_policies(ctx, links: object) -> tuple[str, ...]:
    """``Policies`` links (``{"ID": ...}`` or ``{"Name": ...}``) as IDs of policies that exist.

    Names are resolved once, here, through the replicated ACL records (as a
    Consul token stores its links by ID): renaming a policy later keeps the
    link. An unknown policy is a 400.
    """
    if not isinstance(links, list) or not all(isinstance(link, dict) for link in links):
        raise InvalidArgument('Policies is a list of {"ID": ...} or {"Name": ...} objects')
    ids: list[str] = []
    for link in links:
        link = {str(key).lower(): value for key, value in link.items()}
        if link.get("id"):
            policy_id = check_uuid(link["id"], "a policy ID")
            if policy_id != MANAGEMENT_POLICY_ID and (ctx.acl is None or ctx.acl.policy(policy_id) is None):
                raise InvalidArgument(f"no ACL policy with ID {policy_id}; create it first")
        elif link.get("name"):
            name = link["name"]
            if name == MANAGEMENT_POLICY_NAME:
                policy_id = MANAGEMENT_POLICY_ID
            else:
                found = None
                if isinstance(name, str):
                    for registry in ([] if ctx.acl is None else ctx.acl.registries()):
                        found = registry.policy_named(name)
                        if found is not None:
                            break
                if found is None:
                    raise InvalidArgument(f"no ACL policy named {str(name)[:128]!r}; create it first")
                policy_id = found.policy_id
        else:
            raise InvalidArgument('a policy link names the policy: {"ID": ...} or {"Name": ...}')
        if policy_id not in ids:
            ids.append(policy_id)
    return tuple(ids)


def check_grants(authorizer: Authorizer, record: DeviceRecord, existing: DeviceRecord | None) -> None:
    """Refuse giving a device rights the caller does not hold itself (403 naming the missing one).

    Only what the change adds is checked: keeping or narrowing a device's
    rights needs nothing beyond ``device:write``.
    """
    if authorizer.management:
        return
    before_read = set(existing.kv_read + existing.kv_write) if existing is not None else set()
    before_write = set(existing.kv_write) if existing is not None else set()
    for prefix, access, before in [
        *((p, "write", before_write) for p in record.kv_write),
        *((p, "read", before_read) for p in record.kv_read),
    ]:
        if prefix in before:
            continue
        if not authorizer.allows_subtree("key", prefix, access):
            grant = "KVWrite" if access == "write" else "KVRead"
            hint = (
                ' (a new device reads all KV unless its body says otherwise: send "KVRead": [] or prefixes you may read)'
                if existing is None and access == "read" and prefix == "" else ""
            )
            raise PermissionDenied(
                authorizer.denial("key", prefix, access, subtree=True)
                + f"; a token gives a device {grant} {prefix!r} only if it holds that itself{hint}"
            )
    added = set(record.policy_ids) - set(existing.policy_ids if existing is not None else ())
    if added and not authorizer.allows("acl", "", "write"):
        raise PermissionDenied(authorizer.denial("acl", "", "write") + " (linking Policies to a device)")


def parse_device(device_id: str, body: dict, existing: DeviceRecord | None, ctx=None) -> DeviceRecord:
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
        policy_ids=base.policy_ids if body.get("policies") is None else parse_policies(ctx, body["policies"]),
    )


def oscore_store(ctx, scope: Scope):
    """This edge's OSCORE contexts, if ``scope`` is the site it serves devices of; else a 400 saying where to ask."""
    if ctx.oscore is None or ctx.role != "edge":
        raise InvalidArgument(
            "OSCORE contexts are made by the edge that serves the device (the secret never leaves it): "
            "send PUT /v1/devices/<id>?oscore=true to that site's edge"
        )
    if scope.name != ctx.site:
        raise InvalidArgument(f"this edge serves the devices of {ctx.site!r}; OSCORE contexts are made there, not in {scope.name!r}")
    return ctx.oscore


@device_api.route("/v1/devices", methods=["GET"])
async def list_devices() -> Response:
    """One site's devices; at the hub, ``?dc=global`` lists every site's (the fleet)."""
    ctx = request.ctx
    tags = request.args.getlist("tag")
    kind = request.args.get("type")
    online = request.args.get("online")
    found = []
    for scope in listed_scopes(ctx, request.args.get("dc")):
        for record in readable(records_matching(scope, kind, tags)):
            presence = ctx.device_presence(scope.name, record.device_id)
            if online is not None and presence.online != (online.lower() in ("1", "true", "yes", "")):
                continue
            found.append(device_json(record, presence, scope.name, policy_links(ctx, record.policy_ids)))
    return json_response(found)


@device_api.route("/v1/devices/<device_id>", methods=["GET", "PUT", "DELETE"])
async def device(device_id: str) -> Response:
    ctx = request.ctx
    check_device_id(device_id)
    authorizer = request_authorizer()
    authorizer.require("device", device_id, "read" if request.method == "GET" else "write")
    scope = ctx.scope(request.args.get("dc"))
    if request.method == "DELETE":
        await scope.delete_device(device_id)  # the gateways end its sessions (MQTT, CoAP observations)
        return json_response(True)
    if request.method == "PUT":
        existing = scope.devices.get(device_id)
        record = parse_device(device_id, await json_body(), existing, ctx)
        if ctx.acl is not None and ctx.acl.enabled:
            for prefix in record.kv_read + record.kv_write:  # with ACLs on, a '*' in a prefix is a glob
                check_pattern(prefix, f"the KV prefix {prefix[:64]!r}")
        check_grants(authorizer, record, existing)
        material = None
        if flag("oscore"):
            oscore = oscore_store(ctx, scope)
            sender_id, material = await oscore.create(device_id)
            record = replace(record, oscore_id=sender_id)
        # A rotated token or OSCORE context ends the sessions made with the old
        # one, at once (the gateways and the OSCORE store watch the record).
        try:
            stored, token = await scope.put_device(record, new_token=flag("rotate-token"))
        finally:
            if material is not None:
                oscore.settled(record.oscore_id, True)  # in force only if the record now names it
        body = device_json(stored, ctx.device_presence(scope.name, device_id), scope.name, policy_links(ctx, stored.policy_ids))
        if token is not None:
            body["Token"] = token  # shown once; only its hash is stored
        if material is not None:
            body["OSCORE"] = material  # shown once; the secret stays on this edge only
        return json_response(body, status=201 if existing is None else 200)
    record = scope.devices.get(device_id)
    if record is None:
        raise NotFound(f"no device {device_id!r} is registered in {scope.name!r}")
    return json_response(
        device_json(record, ctx.device_presence(scope.name, device_id), scope.name, policy_links(ctx, record.policy_ids))
    )

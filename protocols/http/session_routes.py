"""``/v1/session``: Consul's sessions, granted by a site's edge for its own site.

The state machine is sync/sessions.py; here are the HTTP shapes (Consul's
field names, answers and status codes, so Consul clients work unchanged), the
ACL rules (Consul's: ``session:write`` on the session's node to create,
renew or destroy it, ``session:read`` to see it) and the refusals: a hub, or
an edge asked for another scope (``?dc=global``, another site), grants no
session and no lock (docs/http-api.md, "Sessions and locks").
"""

from __future__ import annotations

from typing import Any

from konsul.sync.errors import InvalidArgument, KonsulError
from konsul.sync.scope import Scope
from konsul.sync.sessions import KeyLock, SessionSpec, SessionTable, sessions_json

from .agent_routes import json_body_any
from .authz import authorizer, filtered
from .blocking import block_until_changed, index_header
from .params import parse_duration
from .request import request
from .responses import Response, json_response
from .router import Routes

session_api = Routes("session")


class LocksAreLocal(KonsulError):
    """A session or lock asked of an agent that is not the arbiter for that scope."""

    code = "locks_local_to_edge"
    status = 400


def session_table(dc: str | None = None, access: str = "read") -> SessionTable:
    """The session table a request's ``?dc=`` names: only the edge's own site has one.

    A refusal is for those who may ask: a token without ``session:<access>``
    on this agent's node gets the ACL's 403 first, as on any other route.
    """
    ctx = request.ctx
    table: SessionTable | None = getattr(ctx, "sessions", None)
    if table is None or (dc and dc != ctx.site):
        authorizer().require("session", ctx.node, access)
    if table is None:
        where = f" for {dc!r}" if dc else ""
        raise LocksAreLocal(
            f"this {ctx.role} grants no sessions or locks{where}: a lock is held at the edge of the site it "
            "belongs to (one arbiter, so never two holders); send the request to that site's edge"
        )
    if dc and dc != ctx.site:
        raise LocksAreLocal(
            f"this edge grants sessions and locks only for its own site {ctx.site!r}, not {dc!r}: the "
            f"{'global scope is written by every edge' if dc == 'global' else 'other site has its own edge'}, "
            "so a lock granted here could be granted twice; ask the edge of the site the key belongs to"
        )
    return table


def lock_table_for(scope: Scope) -> SessionTable:
    """The table that may lock keys of ``scope`` (a KV ``?acquire=``/``?release=``, txn lock verbs)."""
    ctx = request.ctx
    return session_table(None if scope.name == ctx.site else scope.name, "write")


def lock_lookup(ctx: Any, scope: Scope):
    """``key -> KeyLock | None`` for KV answers of ``scope``; None when no locks can exist there."""
    table: SessionTable | None = getattr(ctx, "sessions", None)
    if table is None or table.scope is not scope or not table.locks:
        return None
    return table.lock_of


def _items(body: dict[str, Any]) -> dict[str, Any]:
    # Consul decodes field names case-insensitively; py-consul sends them in lower case.
    return {str(k).lower(): v for k, v in body.items()}


def _string(body: dict, name: str, default: str = "") -> str:
    value = body.get(name.lower())
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string")
    return value


def _lock_delay(value: Any) -> float:
    if value is None:
        return 15.0
    if isinstance(value, bool):
        raise InvalidArgument("LockDelay is a duration such as \"15s\"")
    if isinstance(value, (int, float)):
        # Consul's rule: a bare number below 1000 is seconds, else nanoseconds.
        return float(value) if value < 1000 else value / 1e9
    if isinstance(value, str):
        return parse_duration(value, "LockDelay")
    raise InvalidArgument("LockDelay is a duration such as \"15s\"")


def _check_list(body: dict, name: str) -> list[str] | None:
    value = body.get(name.lower())
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
        raise InvalidArgument(f"{name} must be a list of check IDs")
    return value


def parse_spec(body: Any) -> SessionSpec:
    if body is None or body == "":
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object (or empty, for the defaults)")
    body = _items(body)
    ttl = _string(body, "TTL")
    spec = SessionSpec(
        name=_string(body, "Name"),
        node=_string(body, "Node"),
        lock_delay_s=_lock_delay(body.get("lockdelay")),
        behavior=_string(body, "Behavior", "release") or "release",
        ttl=ttl,
        ttl_s=parse_duration(ttl, "TTL") if ttl else None,
    )
    checks, node_checks = _check_list(body, "Checks"), _check_list(body, "NodeChecks")
    if checks is not None or node_checks is not None:
        spec.node_checks = list(dict.fromkeys([*(checks or []), *(node_checks or [])]))
    service_checks = body.get("servicechecks")
    if service_checks is not None:
        if not isinstance(service_checks, list) or not all(
            isinstance(c, dict) and isinstance(_items(c).get("id"), str) for c in service_checks
        ):
            raise InvalidArgument('ServiceChecks must be a list of {"ID": "<check id>"}')
        spec.service_checks = [
            {"ID": _items(c)["id"], "Namespace": str(_items(c).get("namespace") or "")} for c in service_checks
        ]
    return spec


@session_api.route("/v1/session/create", methods=["PUT"])
async def create_session() -> Response:
    table = session_table(request.args.get("dc"), "write")
    raw = await request.get_data(cache=True)
    spec = parse_spec(await json_body_any() if raw.strip() else None)
    authorizer().require("session", spec.node or table.node, "write")
    session = await table.create(spec)
    return json_response({"ID": session.id})


@session_api.route("/v1/session/destroy/<session_id>", methods=["PUT"])
async def destroy_session(session_id: str) -> Response:
    table = session_table(request.args.get("dc"), "write")
    found = table.get(session_id)
    authorizer().require("session", found.node if found else table.node, "write")
    return json_response(await table.destroy(session_id))


@session_api.route("/v1/session/renew/<session_id>", methods=["PUT"])
async def renew_session(session_id: str) -> Response:
    table = session_table(request.args.get("dc"), "write")
    found = table.get(session_id)
    authorizer().require("session", found.node if found else table.node, "write")
    return json_response(sessions_json([table.renew(session_id)]))


async def _blocking(table: SessionTable) -> dict[str, str]:
    ctx = request.ctx
    await block_until_changed(lambda: table.last_index, lambda: ctx.feed.event(table.scope.name, "sessions"))
    return index_header(table.last_index)


@session_api.route("/v1/session/info/<session_id>", methods=["GET"])
async def session_info(session_id: str) -> Response:
    table = session_table(request.args.get("dc"))
    headers = await _blocking(table)
    found = table.get(session_id)
    if found is None:
        return json_response([], headers=headers)  # Consul: an unknown session is an empty list
    authorizer().require("session", found.node, "read")
    return json_response(sessions_json([found]), headers=headers)


@session_api.route("/v1/session/node/<node>", methods=["GET"])
async def node_sessions(node: str) -> Response:
    table = session_table(request.args.get("dc"))
    authorizer().require("session", node, "read")
    headers = await _blocking(table)
    return json_response(sessions_json(s for s in table.all() if s.node == node), headers=headers)


@session_api.route("/v1/session/list", methods=["GET"])
async def list_sessions() -> Response:
    table = session_table(request.args.get("dc"))
    headers = await _blocking(table)
    sessions = table.all()
    allowed = authorizer()
    readable = set(allowed.filter("session", sorted({s.node for s in sessions}), "read"))
    visible = [s for s in sessions if s.node in readable]
    return json_response(sessions_json(visible), headers=filtered(len(visible), len(sessions), headers))


def lock_json(lock: KeyLock | None) -> dict[str, Any]:
    """The lock fields of a KV entry."""
    if lock is None:
        return {}
    return {"LockIndex": lock.lock_index, **({"Session": lock.session} if lock.session else {})}

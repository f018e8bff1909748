"""``/v1/kv``: Consul's KV API, plus ``?ttl=`` and ``?history``.

Keys arrive raw in the path (Consul clients do not escape ``/``), so the route
takes the rest of the path and the store's key rules judge it.
"""

from __future__ import annotations

import base64
import time

from konsul.sync.errors import InvalidArgument
from konsul.sync.kv import HistoryRecord, KvEntry
from konsul.sync.sessions import KeyLock

from .authz import authorizer, filtered
from .blocking import block_until_changed, index_header
from .params import duration_arg, flag, int_arg
from .request import QueryArgs, current_request
from .responses import Response, json_response
from .router import Routes
from .session_routes import lock_lookup, lock_table_for

kv_api = Routes("kv")


def entry_json(entry: KvEntry, lock: KeyLock | None = None) -> dict:
    """A KV entry as Consul shows it; ``lock`` is the key's lock at this edge (sessions.py)."""
    body = {
        "LockIndex": entry.lock_index if lock is None else lock.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if lock is not None and lock.session:
        body["Session"] = lock.session
    if entry.expires_ms is not None:  # a Konsul extension: when a key written with ?ttl= expires
        body["Expires"] = _iso_ms(entry.expires_ms)
    return body


def _iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def history_json(record: HistoryRecord) -> dict:
    return {
        "Key": record.key,
        "Op": record.op,
        "Stamp": record.stamp.encode(),
        "Time": record.stamp.iso(),
        "Replica": record.stamp.replica,
        "Flags": record.flags,
        "Size": record.size,
        "Conflict": record.conflict,
        "Value": base64.b64encode(record.value).decode() if record.value is not None else None,
    }


@kv_api.route("/v1/kv/<path:key>", methods=["GET", "PUT", "DELETE"])
async def kv(key: str) -> Response:
    """Consul's KV read, write and delete: the one handler, for routed requests and the fast path alike."""
    current = current_request()  # once: this is the hottest handler (kv_fast_path.py)
    ctx = current.ctx
    scope = ctx.scope(current.args.get("dc"))
    allowed = authorizer()
    method = current.method
    if method == "PUT":
        allowed.require("key", key, "write")
        return await _put(scope, key)
    recurse = flag("recurse")
    if method == "DELETE":
        if recurse:
            allowed.require_subtree("key", key, "write")  # Consul's KeyWritePrefix
        else:
            allowed.require("key", key, "write")
        return await _delete(scope, key, recurse)
    keys = flag("keys")
    if not (keys or recurse):
        allowed.require("key", key, "read")
    return await _get(ctx, scope, key, current.args, keys, recurse)


async def _get(ctx, scope, key: str, args: QueryArgs, keys: bool, recurse: bool) -> Response:
    feed = ctx.feed
    await block_until_changed(
        lambda: scope.kv.last_index, lambda: feed.event(scope.name, "kv")
    )
    headers = index_header(scope.kv.last_index)
    if "history" in args and flag("history"):
        return json_response([history_json(r) for r in scope.kv.history(key)], headers=headers)
    allowed = authorizer()
    locks = lock_lookup(ctx, scope)
    # Lists show what the token may read, as Consul filters them (a key the
    # token may not read is left out; nothing readable is a 404).
    if keys:
        listed = scope.kv.keys(key, args.get("separator") or None)
        visible = allowed.filter("key", listed, "read")
        headers = filtered(len(visible), len(listed), headers)
        if not visible:
            return _not_found(headers)
        return json_response(visible, headers=headers)
    if recurse:
        entries = scope.kv.list(key)
        readable = set(allowed.filter("key", [e.key for e in entries], "read"))
        visible = [e for e in entries if e.key in readable]
        headers = filtered(len(visible), len(entries), headers)
        if not visible:
            return _not_found(headers)
        return json_response([entry_json(e, locks and locks(e.key)) for e in visible], headers=headers)
    entry = scope.kv.get(key)
    if entry is None:
        return _not_found(headers)
    if "raw" in args and flag("raw"):
        return Response(entry.value, content_type="application/octet-stream", headers=headers)
    return json_response([entry_json(entry, locks and locks(key))], headers=headers)


def _not_found(headers: dict[str, str]) -> Response:
    # Consul answers a missing key with an empty 404, and clients rely on it.
    return Response(b"", status=404, content_type="application/json", headers=headers)


async def _put(scope, key: str) -> Response:
    flags = int_arg("flags", default=0)
    cas = int_arg("cas")
    ttl = duration_arg("ttl")
    if ttl is not None and ttl <= 0:
        raise InvalidArgument("ttl must be positive, e.g. ttl=30s")
    value = await current_request().get_data()
    ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
    args = current_request().args
    acquire, release = args.get("acquire"), args.get("release")
    if acquire is not None or release is not None:
        # A lock changes only at the edge that arbitrates the key's site (session_routes).
        if acquire is not None and release is not None:
            raise InvalidArgument("give ?acquire= or ?release=, not both")
        table = lock_table_for(scope)
        step = table.acquire if acquire is not None else table.release
        ok = await step(key, acquire or release or "", value, flags=flags, cas=cas, ttl_ms=ttl_ms)
        return json_response(ok)
    ok = await scope.kv_put(
        key,
        value,
        flags=flags,
        cas=cas,
        ttl_ms=ttl_ms,
    )
    return json_response(ok)


async def _delete(scope, key: str, recurse: bool) -> Response:
    ok = await scope.kv_delete(key, recurse=recurse, cas=int_arg("cas"))
    return json_response(ok)

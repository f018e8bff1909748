"""``/v1/txn``: Consul's KV transactions, all or nothing.

A transaction is a JSON list of up to 64 ``{"KV": {...}}`` operations whose
values are base64, as in Consul. It runs in three passes: parse and validate
everything (a malformed request is a 400 and changes nothing), evaluate every
check in order against the state as the earlier operations would leave it (a
failed check is a 409 listing the failures, and changes nothing), then apply
all writes as one durable change.

The lock verbs (``lock``, ``unlock``, ``check-session``) are those of Consul,
granted by the edge for its own site as ``?acquire=`` is (session_routes.py):
a transaction with one of them is refused at the hub and for other scopes,
and its writes and lock changes are durable together (sessions.py).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from konsul.sync.errors import InvalidArgument
from konsul.sync.limits import check_flags, check_key, check_prefix, check_value

from .agent_routes import json_body_any
from .authz import authorizer
from .kv_routes import entry_json
from .request import request
from .responses import Response, json_response
from .router import Routes
from .session_routes import lock_lookup, lock_table_for

txn_api = Routes("txn")

MAX_OPERATIONS = 64
_READS = {"get", "get-tree", "check-index", "check-not-exists"}
_WRITES = {"set", "cas", "delete", "delete-tree", "delete-cas"}
_LOCKS = {"lock", "unlock", "check-session"}  # need a session (session_routes.py)


@dataclass
class KvOp:
    verb: str
    key: str
    value: bytes = b""
    flags: int = 0
    index: int = 0
    session: str = ""


def parse_operations(body) -> list[KvOp]:
    if not isinstance(body, list):
        raise InvalidArgument("a transaction is a JSON list of operations")
    if len(body) > MAX_OPERATIONS:
        raise InvalidArgument(f"a transaction has at most {MAX_OPERATIONS} operations, this one {len(body)}")
    operations = []
    for position, item in enumerate(body):
        where = f"operation {position}"
        if not isinstance(item, dict) or not isinstance(item.get("KV"), dict):
            raise InvalidArgument(f"{where}: only KV operations are supported ({{\"KV\": {{...}}}})")
        kv = item["KV"]
        verb = kv.get("Verb")
        if verb not in _READS | _WRITES | _LOCKS:
            raise InvalidArgument(f"{where}: unknown verb {verb!r}")
        key = kv.get("Key", "")
        if not isinstance(key, str):
            raise InvalidArgument(f"{where}: Key must be a string")
        (check_prefix if verb in ("get-tree", "delete-tree") else check_key)(key)
        value = b""
        if kv.get("Value") is not None:
            try:
                value = base64.b64decode(kv["Value"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise InvalidArgument(f"{where}: Value is not valid base64") from None
            check_value(value)
        flags, index = kv.get("Flags", 0) or 0, kv.get("Index", 0) or 0
        if not isinstance(flags, int) or not isinstance(index, int) or index < 0:
            raise InvalidArgument(f"{where}: Flags and Index are non-negative integers")
        check_flags(flags)
        session = kv.get("Session") or ""
        if not isinstance(session, str) or (verb in _LOCKS and not session):
            raise InvalidArgument(
                f"{where}: verb {verb!r} needs a Session (the ID of a session holding or taking the lock)"
            )
        operations.append(KvOp(verb, key, value, flags, index, session))
    return operations


def failed_checks(scope, operations: list[KvOp], locks=None) -> list[dict]:
    """Evaluate checks in order, seeing the effects of earlier writes in the transaction.

    ``locks`` is the site's SessionTable when the transaction has lock verbs.
    """
    overlay: dict[str, int | None] = {}  # key -> modify index, None when deleted by the txn
    holders: dict[str, str | None] = {}  # key -> lock holder as the txn leaves it
    pending = object()

    def holder(key: str) -> str | None:
        if key in holders:
            return holders[key]
        return None if locks is None else locks.holder(key)

    def modify_index(key: str):
        if key in overlay:
            return overlay[key]
        entry = scope.kv.get(key)
        return None if entry is None else entry.modify_index

    errors = []
    for position, op in enumerate(operations):
        current = modify_index(op.key)
        problem = None
        if op.verb == "cas" and (op.index == 0 and current is not None or op.index and current != op.index):
            problem = f"current modify index {current} does not match {op.index}"
        elif op.verb in ("check-index", "delete-cas") and current != op.index:
            problem = f"current modify index {current} does not match {op.index}"
        elif op.verb == "check-not-exists" and current is not None:
            problem = f"key {op.key!r} exists"
        elif op.verb == "get" and current is None:
            problem = f"key {op.key!r} does not exist"
        elif op.verb == "lock":
            taken = holder(op.key)
            if op.session not in locks.sessions:
                problem = f"invalid session {op.session!r}"
            elif taken is not None and taken != op.session:
                problem = f"failed to lock key {op.key!r}, lock is already held"
            elif taken is None and locks.lock_delayed(op.key):
                problem = f"failed to lock key {op.key!r}: it is in its lock-delay after a session ended"
        elif op.verb in ("unlock", "check-session") and holder(op.key) != op.session:
            problem = f"key {op.key!r} is not locked by session {op.session!r}"
        if problem:
            errors.append({"OpIndex": position, "What": problem})
        if op.verb in ("set", "cas", "lock", "unlock"):
            overlay[op.key] = pending  # written by this txn; its index is not known yet
            if op.verb != "set" and op.verb != "cas":
                holders[op.key] = op.session if op.verb == "lock" else None
        elif op.verb in ("delete", "delete-cas"):
            overlay[op.key] = None
            holders[op.key] = None
        elif op.verb == "delete-tree":
            for key in scope.kv.keys(op.key):
                overlay[key] = None
                holders[key] = None
            for key in list(overlay):
                if key.startswith(op.key):
                    overlay[key] = None
                    holders[key] = None
    return errors


def require_operations(operations: list[KvOp]) -> None:
    """Every operation's permission, before anything runs (a refusal changes nothing).

    As in Consul, a transaction is all or nothing for ACLs too: one operation
    the token may not do refuses the whole transaction.
    """
    allowed = authorizer()
    for op in operations:
        if op.verb == "delete-tree":
            allowed.require_subtree("key", op.key, "write")
        elif op.verb == "get-tree":
            allowed.require_subtree("key", op.key, "read")
        elif op.verb in _WRITES or op.verb in ("lock", "unlock"):
            allowed.require("key", op.key, "write")
        else:
            allowed.require("key", op.key, "read")


@txn_api.route("/v1/txn", methods=["PUT"])
async def transaction() -> Response:
    ctx = request.ctx
    scope = ctx.scope(request.args.get("dc"))
    operations = parse_operations(await json_body_any())
    require_operations(operations)
    locks = lock_table_for(scope) if any(op.verb in _LOCKS for op in operations) else None
    errors = failed_checks(scope, operations, locks)
    if errors:
        return json_response({"Results": None, "Errors": errors}, status=409)
    writes = []
    lock_ops = []
    for op in operations:
        if op.verb in ("set", "cas", "lock", "unlock"):
            writes.append(("set", op.key, op.value, op.flags))
            if op.verb in ("lock", "unlock"):
                lock_ops.append((op.verb, op.key, op.session))
        elif op.verb in ("delete", "delete-cas"):
            writes.append(("delete", op.key))
        elif op.verb == "delete-tree":
            writes.append(("delete-tree", op.key))
    if locks is not None and (writes or lock_ops):
        # No await since the checks: they still hold (one trio thread).
        await locks.apply_txn(writes, lock_ops)
    elif writes:
        await scope.kv_apply(writes)
    lock_of = lock_lookup(ctx, scope)
    results = []
    for op in operations:
        if op.verb == "get-tree":
            results.extend({"KV": entry_json(e, lock_of and lock_of(e.key))} for e in scope.kv.list(op.key))
        elif op.verb in ("get", "set", "cas", "check-index", "lock", "unlock", "check-session"):
            entry = scope.kv.get(op.key)
            if entry is not None:
                body = entry_json(entry, lock_of and lock_of(op.key))
                if op.verb != "get":
                    body["Value"] = None  # Consul returns values only for reads
                results.append({"KV": body})
    return json_response({"Results": results, "Errors": None})

"""Consul sessions and the KV locks they hold, at one site's edge.

A session is a lease: created with an optional TTL, health checks, a
lock-delay and a behaviour, renewed by its holder, and invalidated when it is
destroyed, its TTL runs out (Consul's rule: twice the TTL after the last
renewal) or one of its checks goes critical. A key is locked by writing it with
``?acquire=<session>``; at most one session holds a key at a time. When a
session ends, each key it holds is released (behaviour ``release``: the value
stays, ``Session`` is cleared) or deleted (``delete``), and no session may take
it again for the session's lock-delay.

Why locks are local. The value of a key is replicated (CRDT) and every
replica may write it; a lock is a promise that needs one arbiter. This edge is
the arbiter for its own site's scope, so the lock table lives beside the
replicated documents, in this replica's store only (the ``meta`` table, written
in the same transaction as the value a lock change writes). The hub and other
replicas see the value but no ``Session`` and no ``LockIndex``. Locks in the
global scope, or taken at the hub, could be granted twice by two arbiters, so
they are refused (protocols/http/session_routes.py).

Durability. A session create, destroy, acquire or release is acknowledged once
it is on disk, as any write; after a restart (kill -9 included) the sessions
and locks are back. A TTL timer starts again from the full TTL at start-up, as
Consul restarts its timers when a new leader takes over.

A lock belongs to one incarnation of its key: it records the key's
CreateIndex, and a key that was deleted (by anyone, on any replica, or by
expiry) and written again is a new key with no lock.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from .batch import WriteBatch
from .errors import InvalidArgument, KonsulError, NotFound, StoreError
from .scope import Scope

log = logging.getLogger(__name__)

SERF_HEALTH = "serfHealth"  # the node's own liveness check; this edge's node is alive while it answers
BEHAVIORS = ("release", "delete")
DEFAULT_LOCK_DELAY_S = 15.0
MAX_LOCK_DELAY_S = 60.0
DEFAULT_TTL_MIN_S = 10.0
TTL_MAX_S = 86400.0
TTL_MULTIPLIER = 2  # Consul invalidates a session twice its TTL after its last renewal
META_PREFIX = "consul_sessions/"
RETRY_S = 1.0  # after the store refused to record an invalidation


class InvalidSession(KonsulError):
    """A lock operation names a session that does not exist (any more)."""

    code = "invalid_session"
    status = 400


class SessionCheckFailing(KonsulError):
    code = "session_check_failing"
    status = 400


@dataclass(slots=True)
class SessionSpec:
    """What a create asks for, parsed (durations in seconds)."""

    name: str = ""
    node: str = ""
    lock_delay_s: float = DEFAULT_LOCK_DELAY_S
    behavior: str = "release"
    ttl: str = ""  # as given ("30s"); "" is no TTL
    ttl_s: float | None = None
    node_checks: list[str] | None = None  # None: the default, [serfHealth]
    service_checks: list[dict[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Session:
    id: str
    name: str
    node: str
    lock_delay_s: float
    behavior: str
    ttl: str
    ttl_s: float | None
    node_checks: list[str]
    service_checks: list[dict[str, str]]
    create_index: int
    modify_index: int
    deadline: float | None = None  # trio time past which it ends unless renewed

    def to_json(self) -> dict[str, Any]:
        """As Consul shows a session (LockDelay in nanoseconds)."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(self.lock_delay_s * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [dict(c) for c in self.service_checks] or None,
            # Before Consul 1.7 the node's and services' checks were one list.
            "Checks": list(self.node_checks) + [c["ID"] for c in self.service_checks],
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def check_ids(self) -> list[str]:
        return [*self.node_checks, *(c["ID"] for c in self.service_checks)]

    def record(self) -> list:
        return [self.id, self.name, self.node, self.lock_delay_s, self.behavior, self.ttl, self.ttl_s,
                self.node_checks, self.service_checks, self.create_index, self.modify_index]

    @classmethod
    def from_record(cls, record: list) -> Session:
        return cls(*record)


@dataclass(slots=True)
class KeyLock:
    """A key's lock state at this edge: its holder (None once released) and LockIndex."""

    session: str | None
    lock_index: int
    create_index: int  # the key incarnation the lock belongs to


class SessionTable:
    """The sessions of one site and the locks they hold on its KV keys.

    Args:
        scope: the site's scope (its KV and its store).
        node: this edge's node name, every session's default node.
        checks: the agent's check table (``.checks``: id -> status), whose
            critical checks end the sessions bound to them.
        ttl_min_s: the shortest TTL allowed (Consul's ``session_ttl_min``).
    """

    def __init__(self, scope: Scope, node: str, checks: Any = None, ttl_min_s: float = DEFAULT_TTL_MIN_S) -> None:
        self.scope = scope
        self.node = node
        self.checks = checks
        self.ttl_min_s = ttl_min_s
        self.sessions: dict[str, Session] = {}
        self.locks: dict[str, KeyLock] = {}
        self.delays: dict[str, int] = {}  # key -> wall ms before which no session may acquire it
        self.last_index = 0  # index of the last change to the sessions
        self._wake = trio.Event()
        self._loaded_at = trio.current_time()
        self._load()
        if checks is not None:
            checks.listeners.append(self._wake_soon)

    # -- reading ---------------------------------------------------------------

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def all(self) -> list[Session]:
        return sorted(self.sessions.values(), key=lambda s: s.create_index)

    def lock_of(self, key: str) -> KeyLock | None:
        """The lock state shown on ``key`` (None: never locked in this incarnation)."""
        lock = self.locks.get(key)
        if lock is None:
            return None
        entry = self.scope.kv.get(key)
        if entry is None or entry.create_index != lock.create_index:
            return None  # the key was deleted since: its lock went with it
        return lock

    def holder(self, key: str) -> str | None:
        lock = self.lock_of(key)
        return None if lock is None else lock.session

    def held_by(self, session_id: str) -> list[str]:
        return sorted(k for k, lock in self.locks.items() if lock.session == session_id and self.lock_of(k))

    def lock_delayed(self, key: str) -> bool:
        until = self.delays.get(key)
        return until is not None and until > self.scope.clock.wall_ms()

    # -- sessions --------------------------------------------------------------

    async def create(self, spec: SessionSpec) -> Session:
        node = spec.node or self.node
        if node != self.node and not any(s.node == node for s in self.scope.catalog.services()):
            raise NotFound(
                f"no node {node!r} is registered at this edge (its own node is {self.node!r}); "
                "register it in the catalog first, or leave Node out"
            )
        if spec.behavior not in BEHAVIORS:
            raise InvalidArgument(f"Behavior is release or delete, not {spec.behavior!r}")
        if not 0 <= spec.lock_delay_s <= MAX_LOCK_DELAY_S:
            raise InvalidArgument(f"LockDelay is between 0s and {MAX_LOCK_DELAY_S:g}s")
        if spec.ttl_s is not None and spec.ttl_s != 0:
            if not self.ttl_min_s <= spec.ttl_s <= TTL_MAX_S:
                raise InvalidArgument(
                    f"Invalid Session TTL {spec.ttl!r}: it must be between {self.ttl_min_s:g}s and {TTL_MAX_S:g}s"
                )
        node_checks = [SERF_HEALTH] if spec.node_checks is None else list(dict.fromkeys(spec.node_checks))
        session = Session(
            str(uuid.uuid4()), spec.name, node, spec.lock_delay_s, spec.behavior,
            spec.ttl if spec.ttl_s else "", spec.ttl_s or None, node_checks, list(spec.service_checks), 0, 0,
        )
        for check_id in session.check_ids():
            problem = self._check_problem(check_id, at_create=True)
            if problem:
                raise SessionCheckFailing(f"cannot bind the session to check {check_id!r}: {problem}")

        def change(batch: WriteBatch):
            index = self.scope.index.bump()
            session.create_index = session.modify_index = index
            self.sessions[session.id] = session
            self._renew_deadline(session)
            self.last_index = index
            self._persist(batch)
            return session, {"sessions": {session.id}}

        session = await self.scope.local_change(change)
        self._wake_soon()
        return session

    def renew(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"Session id {session_id!r} not found")
        self._renew_deadline(session)
        self._wake_soon()
        return session

    async def destroy(self, session_id: str, reason: str = "destroyed") -> bool:
        """End a session (Consul answers true whether or not it existed)."""
        if session_id not in self.sessions:
            return True
        await self._invalidate([session_id], reason)
        return True

    # -- locks -------------------------------------------------------------------

    async def acquire(
        self, key: str, session_id: str, value: bytes, *, flags: int = 0, cas: int | None = None,
        ttl_ms: int | None = None,
    ) -> bool:
        """``PUT ?acquire=``: write and lock ``key`` unless another session holds it."""
        self.require_session(session_id)

        def change(batch: WriteBatch):
            if not self._may_lock(key, session_id):
                return False, {}
            if not self.scope.kv.put(key, value, batch, flags=flags, cas=cas, ttl_ms=ttl_ms):
                return False, {}
            self._lock(key, session_id)
            self._persist(batch)
            return True, {"kv": {key}}

        return await self.scope.local_change(change)

    async def release(
        self, key: str, session_id: str, value: bytes, *, flags: int = 0, cas: int | None = None,
        ttl_ms: int | None = None,
    ) -> bool:
        """``PUT ?release=``: write ``key`` and unlock it, if ``session_id`` holds it."""
        self.require_session(session_id)

        def change(batch: WriteBatch):
            if self.holder(key) != session_id:
                return False, {}
            if not self.scope.kv.put(key, value, batch, flags=flags, cas=cas, ttl_ms=ttl_ms):
                return False, {}
            self._unlock(key)
            self._persist(batch)
            return True, {"kv": {key}}

        return await self.scope.local_change(change)

    async def apply_txn(self, writes: list[tuple], lock_ops: list[tuple[str, str, str]]) -> None:
        """A transaction's KV writes and lock changes as one durable change.

        ``writes`` as ``Scope.kv_apply`` takes them; ``lock_ops`` are
        ``("lock"|"unlock", key, session)`` for keys those writes set. The
        caller checked every condition with no await since (txn_routes.py).
        """
        def change(batch: WriteBatch):
            touched: set[str] = set()
            kv = self.scope.kv
            for write in writes:
                if write[0] == "set":
                    kv.put(write[1], write[2], batch, flags=write[3])
                    touched.add(write[1])
                else:
                    recurse = write[0] == "delete-tree"
                    touched.update(kv.keys(write[1]) if recurse else [write[1]])
                    kv.delete(write[1], batch, recurse=recurse)
            for verb, key, session_id in lock_ops:
                if verb == "lock":
                    self._lock(key, session_id)
                else:
                    self._unlock(key)
            self._persist(batch)
            return None, {"kv": touched}

        await self.scope.local_change(change)

    def require_session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidSession(
                f"invalid session {session_id!r}: no such session at this edge (it ended, or was never "
                "created here); create one with PUT /v1/session/create"
            )
        return session

    def may_lock(self, key: str, session_id: str) -> str | None:
        """Why ``session_id`` may not take ``key`` now, or None (for transactions)."""
        if session_id not in self.sessions:
            return f"invalid session {session_id!r}"
        if self.lock_delayed(key):
            return f"key {key!r} is in its lock-delay after a session ended"
        holder = self.holder(key)
        if holder is not None and holder != session_id:
            return f"key {key!r} is locked by another session"
        return None

    def _may_lock(self, key: str, session_id: str) -> bool:
        return self.may_lock(key, session_id) is None

    def _lock(self, key: str, session_id: str) -> None:
        entry = self.scope.kv.get(key)
        assert entry is not None  # just written
        lock = self.lock_of(key)
        if lock is None:
            self.locks[key] = KeyLock(session_id, 1, entry.create_index)
        elif lock.session != session_id:
            lock.session = session_id
            lock.lock_index += 1  # the same session acquiring again keeps the index

    def _unlock(self, key: str) -> None:
        lock = self.lock_of(key)
        if lock is not None:
            lock.session = None

    # -- invalidation ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End sessions whose TTL ran out or whose checks went critical, as they do."""
        task_status.started()
        while True:
            wake = self._wake
            now = trio.current_time()
            expired = [s.id for s in self.sessions.values() if s.deadline is not None and s.deadline <= now]
            failing = [s.id for s in self.sessions.values() if s.id not in expired and self._failing_check(s)]
            try:
                if expired:
                    await self._invalidate(expired, "its TTL ran out")
                if failing:
                    await self._invalidate(failing, "a check it is bound to is critical")
            except StoreError as error:
                # The store refused (disk full, I/O error): nothing changed; the
                # sessions stay due and are tried again, the agent keeps serving.
                log.error("could not end %d session(s): %s; retrying in %gs",
                          len(expired) + len(failing), error, RETRY_S)
                await trio.sleep(RETRY_S)
                continue
            if expired or failing:
                continue
            deadlines = [s.deadline for s in self.sessions.values() if s.deadline is not None]
            with trio.move_on_at(min(deadlines, default=float("inf"))):
                await wake.wait()
            if self._wake is wake:
                self._wake = trio.Event()

    async def _invalidate(self, session_ids: Iterable[str], reason: str) -> None:
        def change(batch: WriteBatch):
            index = self.scope.index.bump()
            now_ms = self.scope.clock.wall_ms()
            touched: set[str] = set()
            ended: set[str] = set()
            for session_id in session_ids:
                session = self.sessions.pop(session_id, None)
                if session is None:
                    continue
                ended.add(session_id)
                for key in self.held_by(session_id):
                    touched.add(key)
                    if session.lock_delay_s > 0:
                        self.delays[key] = now_ms + int(session.lock_delay_s * 1000)
                    if session.behavior == "delete":
                        self.scope.kv.delete(key, batch)
                        self.locks.pop(key, None)
                    else:
                        self.locks[key].session = None
                        self.scope.kv.touch(key, batch)
                log.info("session %s (%s) ended: %s; %d lock(s) %s", session_id, session.name or "unnamed",
                         reason, len(touched), "deleted" if session.behavior == "delete" else "released")
            self.last_index = index
            self._persist(batch)
            return None, {"sessions": ended, "kv": touched}

        await self.scope.local_change(change)

    def _failing_check(self, session: Session) -> bool:
        return any(self._check_problem(c) for c in session.check_ids())

    def _check_problem(self, check_id: str, at_create: bool = False) -> str | None:
        """Why a session may not rest on ``check_id``, or None."""
        if check_id == SERF_HEALTH:
            return None  # this edge's node is alive: it is the one answering
        found = None if self.checks is None else self.checks.checks.get(check_id)
        if found is None:
            return f"no check {check_id!r} is registered at this edge"
        if found.status != "critical":
            return None
        # At start-up every check is critical until first probed or reported:
        # a session from before a restart ends only on a critical seen since.
        seen_since_start = max(found.updated_at, found.critical_since or 0.0) > self._loaded_at
        if at_create or seen_since_start:
            return f"check {check_id!r} is critical"
        return None

    def _renew_deadline(self, session: Session) -> None:
        if session.ttl_s:
            session.deadline = trio.current_time() + session.ttl_s * TTL_MULTIPLIER

    def _wake_soon(self) -> None:
        self._wake.set()

    # -- persistence ---------------------------------------------------------------

    @property
    def _meta_name(self) -> str:
        return META_PREFIX + self.scope.name

    def _persist(self, batch: WriteBatch) -> None:
        """Put the whole table in ``batch``'s meta rows (a few sessions and locks: small)."""
        now_ms = self.scope.clock.wall_ms()
        self.delays = {k: t for k, t in self.delays.items() if t > now_ms}
        live = {k: lock for k in list(self.locks) if (lock := self.lock_of(k)) is not None}
        # A lock whose key is gone was the key's; dropping it here keeps the table small.
        self.locks = live
        batch.meta[self._meta_name] = json.dumps({
            "sessions": [s.record() for s in self.sessions.values()],
            "locks": {k: [lock.session, lock.lock_index, lock.create_index] for k, lock in live.items()},
            "delays": self.delays,
            "last_index": self.last_index,
        }, separators=(",", ":"))

    def _load(self) -> None:
        text = self.scope.store.meta(self._meta_name)
        if not text:
            return
        try:
            state = json.loads(text)
            for record in state["sessions"]:
                session = Session.from_record(record)
                self._renew_deadline(session)
                self.sessions[session.id] = session
            self.locks = {k: KeyLock(*v) for k, v in state["locks"].items()}
            self.delays = {k: int(t) for k, t in state["delays"].items()}
            self.last_index = int(state["last_index"])
        except (ValueError, KeyError, TypeError) as error:
            # Only this replica writes the row; unreadable means a damaged store.
            log.error("the stored sessions of %s are unreadable (%s); starting with none", self.scope.name, error)
            self.sessions, self.locks, self.delays = {}, {}, {}


def sessions_json(sessions: Iterable[Session]) -> list[dict[str, Any]]:
    return [s.to_json() for s in sessions]


"""One replica: a data directory's store, its clock and its scopes."""

from __future__ import annotations

import logging
import os
import secrets

import trio

from .hlc import HybridClock, system_wall_ms
from .scope import Scope
from .store import Store

log = logging.getLogger(__name__)

GLOBAL_SCOPE = "global"


class Replica:
    """Everything one agent (edge or hub) keeps durable.

    Args:
        store: the opened store of the data directory.
        wall_ms: the physical clock; tests pass one driven by trio's MockClock.
    """

    def __init__(self, store: Store, wall_ms=system_wall_ms, history_depth: int = 16) -> None:
        self.store = store
        replica_id = store.meta("replica_id")
        if replica_id is None:
            replica_id = secrets.token_hex(6)
            store.set_meta_now("replica_id", replica_id)
        self.replica_id: str = replica_id
        self.clock = HybridClock(replica_id, wall_ms)
        self.history_depth = history_depth
        self.scopes: dict[str, Scope] = {}
        self._expiry_changed = trio.Event()
        store.on_failure = self._reload_after_failure
        for (name,) in store.query("SELECT DISTINCT scope FROM docs UNION SELECT scope FROM scope_state"):
            self.scope(name)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], durability: str = "full", **kwargs) -> Replica:
        return cls(Store.open(data_dir, durability), **kwargs)

    def scope(self, name: str) -> Scope:
        """The named scope, created empty if it is new."""
        found = self.scopes.get(name)
        if found is None:
            found = self.scopes[name] = Scope(name, self.store, self.clock, self.history_depth)
            found.listeners.append(self._on_change)
        return found

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the store's committer and the TTL reaper until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            nursery.start_soon(self._expire_forever)
            task_status.started()

    def close(self) -> None:
        self.store.close()

    async def _expire_forever(self) -> None:
        while True:
            due = [s.next_expiry_ms() for s in self.scopes.values()]
            due_ms = min((d for d in due if d is not None), default=None)
            changed = self._expiry_changed
            if due_ms is None:
                await changed.wait()
            else:
                delay = max(0.0, (due_ms - self.clock.wall_ms()) / 1000)
                with trio.move_on_after(delay):
                    await changed.wait()
            if changed is self._expiry_changed and changed.is_set():
                self._expiry_changed = trio.Event()
            for scope in list(self.scopes.values()):
                try:
                    await scope.expire_due()
                except Exception:  # the store logs and reloads; try again later
                    log.exception("expiring keys in scope %s failed", scope.name)
                    await trio.sleep(1)

    def _on_change(self, collection: str, keys: set[str]) -> None:
        if collection == "kv":
            self._expiry_changed.set()

    def _reload_after_failure(self, error: Exception) -> None:
        log.error("a write failed (%s); reloading state from %s", error, self.store.path)
        for scope in self.scopes.values():
            scope.load()

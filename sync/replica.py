"""One replica: a data directory's store(s), its clock and its scopes.

An edge keeps all its scopes in one store. The hub keeps each scope in a store
of its own under ``scopes/<name>/`` (``per_scope_stores``), so that a site's
state can be backed up, moved or dropped on its own, and one busy site's
commits do not queue behind another's.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from pathlib import Path

import trio

from .errors import InvalidArgument, NotFound, StoreError
from .hlc import HybridClock, system_wall_ms
from .scope import Scope
from .store import DB_NAME, Store
from .wire import GLOBAL_SCOPE, SCOPE_NAME  # noqa: F401 - GLOBAL_SCOPE is imported from here too

log = logging.getLogger(__name__)

_CREATED_MARK = "scope_created_ms"  # meta row of a scope store made for an accepted session


class TooManyScopes(StoreError):
    """The hub holds as many scopes as it is allowed to; a new one is refused."""


def check_scope_name(name: str) -> str:
    """Site ids name directories on the hub: letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not SCOPE_NAME.fullmatch(name):
        raise InvalidArgument(
            f"site id {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class Replica:
    """Everything one agent (edge or hub) keeps durable.

    Args:
        store: the opened store of the data directory (meta, and the scopes
            unless ``per_scope_stores``).
        wall_ms: the physical clock; tests pass one driven by trio's MockClock.
        per_scope_stores: keep each scope in its own store under ``scopes/``.
        max_scopes: with ``per_scope_stores``, the most scopes this replica
            creates (each costs a store: a database, two threads, a few file
            descriptors). Existing scopes always open.
        max_clock_skew_ms: how far ahead of this replica's wall clock a stamp
            from elsewhere may move its clock (sync/hlc.py).
        scope_options: passed to every :class:`Scope` (auto_compact, epoch_authority).
    """

    def __init__(
        self,
        store: Store,
        wall_ms=system_wall_ms,
        history_depth: int = 16,
        per_scope_stores: bool = False,
        max_scopes: int | None = None,
        max_clock_skew_ms: int | None = None,
        **scope_options,
    ) -> None:
        self.store = store
        replica_id = store.meta("replica_id")
        if replica_id is None:
            replica_id = secrets.token_hex(6)
            store.set_meta_now("replica_id", replica_id)
        self.replica_id: str = replica_id
        self.clock = HybridClock(replica_id, wall_ms)
        if max_clock_skew_ms is not None:
            self.clock.max_skew_ms = max_clock_skew_ms
        self.max_scopes = max_scopes
        self.history_depth = history_depth
        self.scope_options = scope_options
        self.scope_dir = store.path.parent / "scopes" if per_scope_stores else None
        self.durability = store.durability
        self.scopes: dict[str, Scope] = {}
        self._stores: dict[str, Store] = {}
        self._nursery: trio.Nursery | None = None
        self._compaction_waiting = trio.Event()
        self._groups_waiting = trio.Event()
        self._scopes_to_seal: list[Scope] = []
        self._expiry_changed = trio.Event()
        self._waiting_until: int | None = None
        store.on_failure = self._reload_after_failure
        if self.scope_dir is None:
            for (name,) in store.query("SELECT scope FROM docs UNION SELECT scope FROM scope_state UNION SELECT scope FROM updates"):
                self.scope(name)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], durability: str = "full", **kwargs) -> Replica:
        return cls(Store.open(data_dir, durability), **kwargs)

    def quarantined(self) -> dict[str, dict]:
        """Per scope, the stored values no reader could decode (``quarantine.py``)."""
        return {
            name: {"Count": scope.quarantine.count, "Values": scope.quarantine.entries()}
            for name, scope in sorted(self.scopes.items())
            if scope.quarantine.count
        }

    def scope(self, name: str) -> Scope:
        """The named scope; in the shared store it is created empty if new."""
        found = self.scopes.get(name)
        if found is None:
            if self.scope_dir is not None:
                raise NotFound(f"no scope {name!r} is open here")
            found = self._add_scope(name, self.store)
        return found

    async def open_scope(self, name: str, *, create: bool = True) -> Scope:
        """The named scope, opened (or, with ``create``, created) with its own store if need be."""
        if name in self.scopes or self.scope_dir is None:
            return self.scope(name)
        check_scope_name(name)
        path = self.scope_dir / name
        new = not (path / DB_NAME).exists()
        if new:
            if not create:
                raise NotFound(f"no scope {name!r} is stored here")
            if self.max_scopes is not None and len(self.scopes) >= self.max_scopes:
                raise TooManyScopes(
                    f"this hub holds {len(self.scopes)} scopes, its limit; scope {name!r} was not created "
                    "(raise the limit, or remove the directories of sites that are gone)"
                )
        self.scope_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.scope_dir, 0o700)  # tightened if an older version made it 0755
        store = Store.open(path, self.durability)
        if new:
            # Marks a scope made for an accepted session: it opens at every
            # start, with or without data (see _open_stored_scopes).
            store.set_meta_now(_CREATED_MARK, str(self.clock.wall_ms()))
        assert self._nursery is not None, "open_scope needs a running replica"
        try:
            await self._nursery.start(store.run)
        except BaseException:
            store.close()
            raise
        self._stores[name] = store
        store.on_failure = lambda error: self._reload_after_failure(error, name)
        return self.scopes.get(name) or self._add_scope(name, store)

    async def open_scopes(self, names: tuple[str, ...] | list[str]) -> None:
        """Open (or create) every named scope; all names are checked before any is opened."""
        for name in names:
            check_scope_name(name)
        for name in names:
            await self.open_scope(name)

    async def _open_stored_scopes(self) -> None:
        """Open at start-up every scope directory that holds replicated state.

        A directory without a database, or whose database holds nothing
        replicated and no mark of its creation for an accepted session, is
        skipped: it is what a refused sync hello left behind (older versions
        created the store before judging the hello), and a real site's edge
        recreates it on its next connection.
        A damaged database of a scope that holds state stops start-up, as
        any damaged database does (docs/operations.md).
        """
        skipped = 0
        for path in sorted(self.scope_dir.iterdir()):
            if not (path.is_dir() and SCOPE_NAME.fullmatch(path.name)) or path.name in self.scopes:
                continue
            if path.name != "global" and not _holds_state(path / DB_NAME):
                skipped += 1
                continue
            await self.open_scope(path.name, create=False)
        if skipped:
            log.warning(
                "skipped %d scope directories under %s that hold no replicated state "
                "(their sites' edges recreate them when they connect)",
                skipped, self.scope_dir,
            )

    def stores(self) -> list[Store]:
        return [self.store, *self._stores.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the stores' committers and the TTL reaper until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.store.run)
            if self.scope_dir is not None and self.scope_dir.is_dir():
                await self._open_stored_scopes()
            nursery.start_soon(self._expire_forever)
            nursery.start_soon(self._compact_when_quiet_forever)
            nursery.start_soon(self._seal_submitted_forever)
            task_status.started()

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self.store.close()

    def _add_scope(self, name: str, store: Store) -> Scope:
        scope = self.scopes[name] = Scope(name, store, self.clock, self.history_depth, **self.scope_options)
        scope.listeners.append(self._on_change)
        scope.on_compaction_waiting = self._wake_compactor
        scope.on_group_waiting = self._wake_sealer
        return scope

    def _wake_sealer(self, scope: Scope) -> None:
        self._scopes_to_seal.append(scope)
        self._groups_waiting.set()

    async def _seal_submitted_forever(self) -> None:
        """Seal the put groups that writes submitted without a task opened (``Scope.kv_submit``)."""
        while True:
            await self._groups_waiting.wait()
            self._groups_waiting = trio.Event()
            # One scheduling pass first, as a kv_put leader waits: the writes
            # that are ready (a burst of device messages) join the group.
            await trio.lowlevel.cancel_shielded_checkpoint()
            scopes, self._scopes_to_seal = self._scopes_to_seal, []
            for scope in scopes:
                scope.seal_submitted()

    def _wake_compactor(self) -> None:
        # Not the event's bound set(): the compactor replaces the event each time.
        self._compaction_waiting.set()

    async def _compact_when_quiet_forever(self) -> None:
        while True:
            await self._compaction_waiting.wait()
            self._compaction_waiting = trio.Event()
            for scope in list(self.scopes.values()):
                try:
                    await scope.compact_when_quiet()
                except Exception:  # the store logs and reloads; the next due compaction tries again
                    log.exception("compacting scope %s failed", scope.name)

    async def _expire_forever(self) -> None:
        while True:
            due = [s.next_expiry_ms() for s in self.scopes.values()]
            due_ms = min((d for d in due if d is not None), default=None)
            changed = self._expiry_changed
            self._waiting_until = due_ms
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
        # Wake the reaper only when a change brings an expiry earlier than the
        # one it sleeps towards (most writes carry no TTL at all).
        if collection != "kv":
            return
        due = min((s.next_expiry_ms() for s in self.scopes.values()), key=lambda d: d or 2**63, default=None)
        if due is not None and (self._waiting_until is None or due < self._waiting_until):
            self._expiry_changed.set()

    def _reload_after_failure(self, error: Exception, only: str | None = None) -> None:
        log.error("a write failed (%s); reloading state from disk", error)
        for scope in self.scopes.values():
            if only is None or scope.name == only:
                scope.load()


def _holds_state(path: Path) -> bool:
    """Whether a scope database holds replicated state (a damaged one counts as holding it)."""
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            if conn.execute("SELECT 1 FROM meta WHERE name = ?", (_CREATED_MARK,)).fetchone():
                return True
            for table in ("docs", "updates", "kv_index"):
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                    return True
            return False
        finally:
            conn.close()
    except sqlite3.Error:
        return True  # let Store.open judge it, and report it by name

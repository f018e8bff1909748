"""A scope: one site's (or the fleet's) replicated state on one replica.

A scope holds one pycrdt document per collection (``kv``, ``catalog``), their
per-replica views, the scope's change counter, and the glue to the store:
every change is applied in memory, collected into one :class:`WriteBatch`
(CRDT update, index rows, history) and acknowledged once the store has it.

Grouped puts
------------
``kv_put`` is the hot path: with many concurrent writers, a pycrdt transaction,
a Yjs update and an ``updates`` row per put cost more than the rest of the put.
So puts that arrive together form a :class:`_PutGroup`. Each applies itself to
the view at once (reads after it see it) and stages its CRDT change; the first
put of a group, its leader, yields once so that the writers ready to run join
it, then seals the group: one transaction and one update for every staged put,
one batch queued in the store. Every put of the group is acknowledged once that
batch is durable. Any other change seals the open group first, so the document,
its update log and the batches keep the order the changes were made in.

A put that is still alone after that yield, and finds the store idle, commits
on trio's thread (``Store.write_now``): there is nothing for its round to
overlap with, and the two thread hand-offs would cost more than the commit.
Only if the group before was a lone put too: trio runs the tasks of a
scheduling pass in random order, so a leader may find itself alone before the
writers it has just acknowledged rejoin, and blocking them for a commit would
cost more than the hand-offs.
A leader that finds the store idle but its disk slow seals at once instead,
without yielding: its group goes straight to the writer thread.

This is the one batching path for KV writes. The device gateways (MQTT
messages, CoAP PUTs) have no task per write to lead a group with: they submit
writes synchronously (``kv_submit``), which join the open group, or open one
that no task leads; the replica's sealer seals such a group after the same one
scheduling pass, and the store's round reports it through a callback per
write once durable (``WriteRound.when_done``), in the order submitted.

Compaction
----------
A Yjs document keeps a trace of everything ever deleted. When a collection's
update log outgrows its snapshot, the scope rebuilds that collection as a fresh
document (a new *epoch*) holding only the live versions, stores it as the new
snapshot and drops the old log in the same transaction. Disk and memory then
stay proportional to the live content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio
from pycrdt import Doc

from .batch import WriteBatch
from .acl import AclRegistry
from .catalog import NodeRecord, ServiceCatalog, ServiceEntry
from .devices import DeviceRecord, DeviceRegistry
from .errors import InvalidArgument, StoreError
from .hlc import HybridClock, Stamp
from .kv import KvState, ScopeIndex
from .quarantine import Quarantine
from .limits import check_flags, check_key, check_prefix, check_value
from .store import Store
from .tables import kv_rows, scope_counters
from .twin import check_document
from .update_check import UpdateRefused, check_update_soon, refusing_panics
from .versioned import Version, VersionedMap, ignore_update

COLLECTIONS = ("kv", "catalog", "devices", "acl")

# A collection is compacted once what it stores (snapshot plus log) exceeds
# this many times what a fresh document of its live versions would hold, and
# by at least MIN_COMPACTION_BYTES (so tiny stores do not compact constantly).
# A log of new keys is all live content and triggers nothing.
COMPACTION_FACTOR = 1.8
MIN_COMPACTION_BYTES = 64 * 1024
# A compaction while replicas stream updates in (an edge catching up) makes
# the hub send every connected edge a snapshot and makes edges still sending
# in the old epoch adopt it and send their writes again. So while remote
# updates keep arriving, a due compaction waits until they have paused this
# long, unless what is stored grows past twice the threshold.
COMPACTION_QUIET_S = 2.0

T = TypeVar("T")
Listener = Callable[[str, set[str]], None]
# (collection, update, origin): every durable update; origin is the link that
# delivered it, or None for a change made here.
UpdateListener = Callable[[str, bytes, object], None]
# Called (in trio) once a submitted write is durable, with None, or with why it is not.
WriteDone = Callable[[BaseException | None], None]


@dataclass(slots=True)
class _DocState:
    epoch: int
    snapshot_bytes: int
    log_bytes: int


class _PutGroup:
    """Puts that share one CRDT transaction and one batch (see the module doc).

    ``led``: a ``kv_put`` task leads it (seals it and reports its commit);
    otherwise it holds only puts submitted without a task (``kv_submit``), and
    the replica's sealer seals it and the store's round reports it.
    """

    __slots__ = ("batch", "keys", "puts", "round", "own_stamp", "done", "error", "led", "callbacks")

    def __init__(self, led: bool = True) -> None:
        self.batch = WriteBatch()
        self.keys: set[str] = set()
        self.puts = 0
        self.round = None  # the store round, once sealed
        self.own_stamp: Stamp | None = None
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.led = led
        self.callbacks: list[WriteDone] = []  # of the submitted puts, in the order submitted


def _report(done: WriteDone, error: BaseException | None) -> None:
    try:
        done(error)
    except Exception:  # noqa: BLE001 - one caller's bug must not keep the others waiting
        logging.getLogger("konsul.sync").exception("a KV write's completion callback failed")


class Scope:
    """Replicated KV and catalog of one scope, durable through ``store``."""

    def __init__(
        self,
        name: str,
        store: Store,
        clock: HybridClock,
        history_depth: int = 16,
        auto_compact: bool = True,
        epoch_authority: bool = True,
    ) -> None:
        self.name = name
        self.store = store
        self.clock = clock
        self.history_depth = history_depth
        # A scope replicated from a hub follows the hub's epochs instead.
        self.auto_compact = auto_compact
        # Epoch 1 is the lineage every replica starts in. The hub numbers its
        # compactions 2, 3, ...; anyone else's go -1, -2, ..., so a local epoch
        # can never be mistaken for one of the hub's.
        self.epoch_authority = epoch_authority
        self.index = ScopeIndex()
        self.quarantine = Quarantine(name)  # stored values no reader can decode
        self.listeners: list[Listener] = []
        self.update_listeners: list[UpdateListener] = []
        self.epoch_listeners: list[Callable[[str], None]] = []
        self._durable_own_stamp: Stamp | None = None
        self._batch: WriteBatch | None = None
        self._open_group: _PutGroup | None = None
        self._last_group_puts = 0  # puts in the group sealed last
        self._docs: dict[str, _DocState] = {}
        self.compactions = 0
        self._compacting = False
        self._last_remote_update = -float("inf")  # trio time
        self._compactions_waiting: set[str] = set()
        # Called when a compaction waits for a pause; the replica then runs
        # compact_when_quiet in the background.
        self.on_compaction_waiting: Callable[[], None] = lambda: None
        # Called when kv_submit opens a put group no task leads; the replica's
        # sealer then calls seal_submitted after one scheduling pass.
        self.on_group_waiting: Callable[[Scope], None] | None = None
        self.load()

    # -- loading ---------------------------------------------------------------

    def load(self) -> None:
        """(Re)build the whole scope from the store."""
        group, self._open_group = self._open_group, None
        if group is not None:
            # Its puts were in memory only, and memory is rebuilt from disk.
            group.error = StoreError("an earlier write failed, so this one was not stored")
            if not group.led:
                self._group_finished(group)
        store, name = self.store, self.name
        index, kv_last, conflicts = scope_counters(store.query, name)
        self.index.value = index
        versions = {c: self._load_collection(c) for c in COLLECTIONS}
        self.kv = KvState(name, versions["kv"], self.index, self.clock, self.history_depth, self.quarantine)
        index_rows, history_rows = kv_rows(store.query, name)
        self.kv.load(index_rows, history_rows, conflicts, kv_last)
        self.catalog = ServiceCatalog(versions["catalog"], self.index, self.clock, self.quarantine)
        self.catalog.last_index = index
        self.devices = DeviceRegistry(versions["devices"], self.index, self.clock, self.quarantine)
        self.devices.last_index = index
        self.acl = AclRegistry(versions["acl"], self.index, self.clock, self.quarantine)
        self.acl.last_index = index
        for collection in versions.values():
            for version in collection.all_versions():
                self.clock.observe(version.stamp)
        # Everything just loaded is on disk, own writes included.
        self._durable_own_stamp = self.clock.last

    def _load_collection(self, collection: str) -> VersionedMap:
        doc = Doc()
        rows = self.store.query(
            "SELECT epoch, snapshot FROM docs WHERE scope = ? AND collection = ?",
            self.name,
            collection,
        )
        epoch, snapshot = rows[0] if rows else (1, b"")
        if snapshot:
            doc.apply_update(snapshot)
        log_bytes = 0
        for (data,) in self.store.query(
            "SELECT data FROM updates WHERE scope = ? AND collection = ? AND epoch = ? ORDER BY seq",
            self.name,
            collection,
            epoch,
        ):
            doc.apply_update(data)
            log_bytes += len(data)
        self._docs[collection] = _DocState(epoch, len(snapshot), log_bytes)
        return VersionedMap(doc, self._recorder(collection))

    def _recorder(self, collection: str) -> Callable[[bytes], None]:
        def record(update: bytes) -> None:
            if self._batch is None:
                raise RuntimeError("a document changed outside a scope transaction")
            state = self._docs[collection]
            state.log_bytes += len(update)
            self._batch.updates.append((self.name, collection, state.epoch, update))

        return record

    # -- KV ----------------------------------------------------------------------

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        flags: int = 0,
        cas: int | None = None,
        ttl_ms: int | None = None,
    ) -> bool:
        group = self._open_group
        leader = group is None
        if leader:
            group = self._open_group = _PutGroup()
        ok = False
        try:
            # Staged: the document changes when the group is sealed.
            ok = self.kv.put(key, value, group.batch, flags=flags, cas=cas, ttl_ms=ttl_ms, stage=True)
        finally:
            if leader and not ok:  # nobody joined yet, and a put that raised or failed its CAS changed nothing
                self._open_group = None
        if not ok:
            return False
        group.keys.add(key)
        group.puts += 1
        if leader:
            await self._lead(group)
        else:
            await group.done.wait()
            if group.error is not None:
                raise group.error
        return True

    async def _lead(self, group: _PutGroup) -> None:
        """Seal ``group`` once the ready writers joined it; report its commit to all."""
        # Never cancelled: the others' acknowledgements wait on this task.
        store = self.store
        if not store.idle or store.can_write_now:
            # Let the writers that are ready join first: the group would wait
            # for the disk anyway, or it learns whether it is alone. (A yield
            # that is no cancel point costs a third of a shielded scope, which
            # a lone put would pay for nothing.)
            await trio.lowlevel.cancel_shielded_checkpoint()
        if self._open_group is group:
            lone = group.puts == 1 and self._last_group_puts == 1
            self._seal(write_now=lone and store.can_write_now)
        if group.round is not None:
            with trio.CancelScope(shield=True):
                try:
                    await store.wait(group.round)
                except BaseException as error:
                    group.error = error
        self._group_finished(group)
        if group.error is not None:
            raise group.error
        await self._compact_if_needed("kv")

    def _group_finished(self, group: _PutGroup) -> None:
        """Tell the listeners and every put of a sealed group how its batch ended."""
        if group.error is None:
            self._committed(group.batch, "kv", group.keys, None, group.own_stamp)
        group.done.set()
        for callback in group.callbacks:
            _report(callback, group.error)

    # -- KV writes submitted without a task (device gateways) -----------------------------

    def kv_submit(self, write: tuple, done: WriteDone) -> None:
        """Queue one KV write for a caller that has no task to wait in: a device gateway.

        ``write`` is ``("set", key, value, flags)`` or ``("delete", key)``. It is
        checked (a :class:`KonsulError` such as ``InvalidKey``: nothing changed)
        and applied to memory now; ``done(None)`` is called in trio once it is durable, or
        ``done(error)`` if it is not. A put joins the open put group, the one
        batching path of the scope, with the ``kv_put`` calls and other
        submissions that arrive with it (see the module doc); a delete seals
        the group first, as every other change does. So writes are made
        durable, and reported, in the order they were submitted.

        Needs the replica's sealer (``on_group_waiting``), which seals a group
        no ``kv_put`` leads.
        """
        if write[0] == "set":
            _op, key, value, flags = write
            check_key(key)
            check_value(value)
            check_flags(flags)
            group = self._open_group
            opened = group is None
            if opened:
                if self.on_group_waiting is None:
                    raise RuntimeError("kv_submit needs a running replica to seal its puts")
                group = self._open_group = _PutGroup(led=False)
            try:
                self.kv.put(key, value, group.batch, flags=flags, stage=True)  # staged, as kv_put's
            except BaseException:
                if opened:  # nothing was staged in it
                    self._open_group = None
                raise
            group.keys.add(key)
            group.puts += 1
            group.callbacks.append(done)
            if opened:
                self.on_group_waiting(self)
        elif write[0] == "delete":
            check_key(write[1])
            existed = self.kv.get(write[1]) is not None
            batch = self._begin()
            try:
                self.kv.delete(write[1], batch)
            finally:
                self._batch = None
            # Queued even when there was nothing to delete (the batch then holds
            # the scope's counters only): its report keeps its place in the order.
            # Listeners hear only of a key that was there, as with kv_apply.
            own_stamp = self._close(batch)
            keys = {write[1]} if existed else set()
            self.store.enqueue(batch).when_done(
                lambda error: self._submitted_change_done(batch, keys, own_stamp, done, error)
            )
        else:
            raise InvalidArgument(f"unknown KV write {write[0]!r}")

    def seal_submitted(self) -> None:
        """Seal the open put group if no ``kv_put`` leads it (the replica's sealer calls this)."""
        group = self._open_group
        if group is None or group.led:
            return
        # Always through the writer thread, never write_now: a device that
        # keeps several QoS 1 messages in flight sends the next ones while this
        # group commits, and they must be read meanwhile to form the next group
        # (write_now would block the event loop for the commit).
        self._seal()

    def _submitted_group_done(self, group: _PutGroup, error: BaseException | None) -> None:
        if error is not None and group.error is None:
            group.error = error
        self._group_finished(group)
        if group.error is None:
            self._compact_soon("kv")

    def _submitted_change_done(
        self, batch: WriteBatch, keys: set[str], own_stamp: Stamp | None, done: WriteDone, error: BaseException | None
    ) -> None:
        if error is None:
            if keys:
                self._committed(batch, "kv", keys, None, own_stamp)
            else:  # nothing was there to delete: nobody to tell
                self._durable_own_stamp = own_stamp
        _report(done, error)
        if error is None:
            self._compact_soon("kv")

    def _compact_soon(self, collection: str) -> None:
        """Hand a due compaction to the replica's compactor (no task here to run it in)."""
        if self.auto_compact and collection not in self._compactions_waiting and self.needs_compaction(collection):
            self._compactions_waiting.add(collection)
            self.on_compaction_waiting()

    def _seal(self, write_now: bool = False) -> None:
        """Flush the open group's staged puts into its batch and queue it.

        With ``write_now``, commit it on this thread instead (``Store.write_now``).
        """
        group, self._open_group = self._open_group, None
        assert group is not None
        self._last_group_puts = group.puts
        self._batch = group.batch
        try:
            self.kv.versions.flush()
            group.own_stamp = self._close(group.batch)
            if write_now:
                self.store.write_now(group.batch)
            else:
                group.round = self.store.enqueue(group.batch)
        except Exception as error:
            group.error = error
        finally:
            self._batch = None
        if not group.led:  # no task waits for it: the round reports it
            if group.round is None:
                self._submitted_group_done(group, None)
            else:
                group.round.when_done(lambda error: self._submitted_group_done(group, error))

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        batch = self._begin()
        try:
            before = set(self.kv.keys(key)) if recurse else {key}
            ok = self.kv.delete(key, batch, recurse=recurse, cas=cas)
        finally:
            self._batch = None
        if ok and batch:
            await self._finish(batch, "kv", before)
        return ok

    async def kv_apply(self, writes: list[tuple]) -> None:
        """Several KV writes as one durable change (Consul's transactions).

        Each write is ``("set", key, value, flags)``, ``("delete", key)`` or
        ``("delete-tree", prefix)``. All are validated before any is applied, so
        a bad one changes nothing.
        """
        for write in writes:
            if write[0] == "set":
                check_key(write[1])
                check_value(write[2])
                check_flags(write[3])
            elif write[0] == "delete":
                check_key(write[1])
            elif write[0] == "delete-tree":
                check_prefix(write[1])
            else:
                raise InvalidArgument(f"unknown KV write {write[0]!r}")
        batch = self._begin()
        touched: set[str] = set()
        try:
            for write in writes:
                if write[0] == "set":
                    self.kv.put(write[1], write[2], batch, flags=write[3])
                    touched.add(write[1])
                else:
                    recurse = write[0] == "delete-tree"
                    if recurse:
                        touched.update(self.kv.keys(write[1]))
                    else:
                        touched.add(write[1])
                    self.kv.delete(write[1], batch, recurse=recurse)
        finally:
            self._batch = None
        if batch:
            await self._finish(batch, "kv", touched)

    async def local_change(self, change: Callable[[WriteBatch], tuple[T, dict[str, set[str]]]]) -> T:
        """Apply ``change(batch)`` as one durable change; returns its result.

        For state kept beside the replicated documents, in the batch's meta
        rows (sessions and KV locks, sessions.py): ``change`` may also write KV
        through ``self.kv`` with the same batch, so a lock and its value are
        durable together. It returns its result and, per collection, the keys
        it changed; the listeners hear of each once the batch is durable.
        """
        batch = self._begin()
        try:
            result, touched = change(batch)
        finally:
            self._batch = None
        if not batch:
            return result
        own_stamp = self._close(batch)
        await self.store.commit(batch)
        # The CRDT updates (KV writes) reach the update listeners once, with "kv".
        self._committed(batch, "kv", touched.get("kv", set()), None, own_stamp)
        for collection, keys in touched.items():
            if collection != "kv":
                for listener in list(self.listeners):
                    listener(collection, keys)
        if batch.updates:
            await self._compact_if_needed("kv")
        return result

    async def expire_due(self) -> list[str]:
        """Hide the keys whose TTL has passed (call when :meth:`next_expiry_ms` is due)."""
        now = self.clock.wall_ms()
        due = self.kv.next_expiry_ms()
        if due is None or due > now:
            # The reaper wakes on every KV change; most wake-ups find nothing due.
            return []
        batch = self._begin()
        try:
            expired = self.kv.expire(now, batch)
        finally:
            self._batch = None
        if expired:
            await self._finish(batch, "kv", set(expired))
        return expired

    def next_expiry_ms(self) -> int | None:
        return self.kv.next_expiry_ms()

    # -- catalog -------------------------------------------------------------------

    async def register_service(self, service: ServiceEntry) -> ServiceEntry:
        batch = self._begin()
        try:
            entry = self.catalog.register(service, batch)
        finally:
            self._batch = None
        await self._finish(batch, "catalog", {service.catalog_key})
        return entry

    async def deregister_service(self, node: str, service_id: str) -> None:
        batch = self._begin()
        try:
            self.catalog.deregister(node, service_id, batch)
        finally:
            self._batch = None
        await self._finish(batch, "catalog", {f"{node}/{service_id}"})

    async def register_node(self, record: NodeRecord, service: ServiceEntry | None = None) -> NodeRecord:
        """Write a node record, and a service on it in the same commit."""
        batch = self._begin()
        keys = {record.node}
        try:
            stored = self.catalog.register_node(record, batch, service)
            if service is not None:
                keys.add(service.catalog_key)
        finally:
            self._batch = None
        await self._finish(batch, "catalog", keys)
        return stored

    async def deregister_node(self, node: str) -> None:
        """Remove a node and every service on it."""
        batch = self._begin()
        try:
            keys = self.catalog.deregister_node(node, batch)
        finally:
            self._batch = None
        await self._finish(batch, "catalog", set(keys))

    # -- devices ---------------------------------------------------------------------

    async def put_device(self, record: DeviceRecord, new_token: bool = False) -> tuple[DeviceRecord, str | None]:
        """Create or update a device; the token is returned once, when issued."""
        batch = self._begin()
        try:
            stored, token = self.devices.put(record, batch, new_token)
        finally:
            self._batch = None
        await self._finish(batch, "devices", {f"d/{record.device_id}"})
        return stored, token

    async def delete_device(self, device_id: str) -> None:
        batch = self._begin()
        try:
            touched = self.devices.delete(device_id, batch)
        finally:
            self._batch = None
        await self._finish(batch, "devices", touched)

    async def write_twin(
        self, side: str, device_id: str, document: dict, *, replace: bool = False
    ) -> dict:
        """Merge (or with ``replace``, set) a device's desired or reported state.

        Returns the side's document afterwards. Writing what is already there
        changes nothing and costs no commit.
        """
        check_document(document, side)
        batch = self._begin()
        try:
            touched = self.devices.write_twin(side, device_id, document, replace, batch)
        finally:
            self._batch = None
        if touched:
            await self._finish(batch, "devices", touched)
        return self.devices.twin.document(side, device_id)

    # -- ACL tokens and policies (acl.py) ---------------------------------------------

    async def change_acl(self, change: Callable[[AclRegistry, WriteBatch], T]) -> T:
        """Apply ``change(registry, batch)`` to the ACL records as one durable change."""
        batch = self._begin()
        self.acl.touched = set()
        try:
            result = change(self.acl, batch)
        finally:
            self._batch = None
        if batch:
            await self._finish(batch, "acl", self.acl.touched)
        return result

    # -- replication -------------------------------------------------------------

    async def apply_remote(self, collection: str, update: bytes, origin: object = None) -> set[str]:
        """Merge an update from another replica and make it durable.

        The update is read first (sync/update_check.py): one that no replica
        of ours writes (a collection that does not exist, a version name or
        payload its readers refuse, a block that makes pycrdt panic) raises
        :class:`UpdateRefused` and changes nothing.
        """
        if collection not in COLLECTIONS:
            raise UpdateRefused(f"no collection {collection[:60]!r}; there are {list(COLLECTIONS)}")
        await check_update_soon(update, collection)
        target = self._collection(collection)
        batch = self._begin()
        try:
            changed = refusing_panics(lambda: target.apply_remote(update, batch))
        finally:
            self._batch = None
        if batch:
            await self._finish(batch, collection, changed, origin)
        return changed

    async def adopt_epoch(
        self, collection: str, epoch: int, state: bytes, rebase_after: Stamp | None
    ) -> set[str]:
        """Replace ``collection`` by the hub's epoch ``state``, keeping local writes.

        This replica's own versions stamped after ``rebase_after`` (the last own
        write the hub is known to hold) are written again into the new epoch
        with their original stamps. Each supersedes only the versions of its
        key this replica had seen and no longer holds (its own older ones, and
        those its history records); a version it never saw was concurrent with
        it and stays. So the later stamp wins as in any merge, the loser stays
        readable and counted, and an edge that was offline across a compaction
        loses nothing it wrote.
        """
        old = self._versions(collection)
        mine = sorted(
            (v for v in old.all_versions()
             if v.stamp.replica == self.clock.replica and (rebase_after is None or v.stamp > rebase_after)),
            key=lambda v: v.stamp,
        )
        held = old.live
        past = self.kv.past_stamps if collection == "kv" else (lambda key: ())

        def saw(version: Version) -> bool:
            if version.stamp in (held(version.key) or ()):
                return False  # live here beside the own write: they were concurrent
            return version.stamp.replica == self.clock.replica or version.stamp in past(version.key)

        fresh = VersionedMap(Doc(), ignore_update)
        fresh.apply_update(state)
        batch = self._begin()
        try:
            batch.snapshots[(self.name, collection)] = (epoch, state)
            self._docs[collection] = _DocState(epoch, len(state), 0)
            fresh.on_update = self._recorder(collection)
            with fresh.doc.transaction():  # one update (one frame to the hub) for them all
                for version in mine:
                    fresh.merge_version(version, saw)
            touched = set(old.keys()) | set(fresh.keys())
            target = self._collection(collection)
            target.versions = fresh
            if collection == "kv":
                changed = self.kv.refresh(touched, batch)  # records the conflicts
            else:
                changed = touched
                target.last_index = self.index.bump()
        finally:
            self._batch = None
        await self._finish(batch, collection, changed)
        return changed

    def conflicts(self) -> int:
        """Concurrent writes that lost, in every collection (KV keys, services, device records and twins)."""
        return self.kv.conflicts + self.catalog.conflicts + self.devices.conflicts + self.acl.conflicts

    def durable_own_stamp(self, collection: str) -> Stamp | None:
        """A stamp no earlier than every own write to this scope that is durable here."""
        return self._durable_own_stamp

    def doc(self, collection: str) -> Doc:
        return self._versions(collection).doc

    def epoch(self, collection: str) -> int:
        return self._docs[collection].epoch

    # -- compaction -----------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes of CRDT state this scope keeps in the store (snapshots plus logs)."""
        return sum(s.snapshot_bytes + s.log_bytes for s in self._docs.values())

    def needs_compaction(self, collection: str) -> bool:
        return self._stored_beyond(collection, 1)

    def _stored_beyond(self, collection: str, times: float) -> bool:
        """Whether stored bytes exceed ``times`` the compaction threshold."""
        state = self._docs[collection]
        stored = state.snapshot_bytes + state.log_bytes
        live = self._versions(collection).live_bytes
        return stored > times * (COMPACTION_FACTOR * live + MIN_COMPACTION_BYTES)

    async def compact(self, collection: str) -> None:
        """Rebuild ``collection`` as a fresh document epoch with only live versions."""
        if self._compacting:
            return
        self._compacting = True
        try:
            await self._compact(collection)
        finally:
            self._compacting = False

    async def _compact(self, collection: str) -> None:
        if self._open_group is not None:
            self._seal()
        # An expired key keeps only the fact that it ended.
        ended = self.kv.expired_keys(self.clock.wall_ms()) if collection == "kv" else ()
        fresh = self._versions(collection).rebuilt(ended)
        snapshot = fresh.doc.get_update()
        state = self._docs[collection]
        epoch = state.epoch + 1 if self.epoch_authority else min(state.epoch, 0) - 1
        batch = WriteBatch()
        # The store drops the older epochs' log with the new snapshot.
        batch.snapshots[(self.name, collection)] = (epoch, snapshot)
        # Swap in memory first: writes from now on belong to the new epoch and
        # queue behind this batch, so the log never mixes epochs out of order.
        fresh.on_update = self._recorder(collection)
        self._docs[collection] = _DocState(epoch, len(snapshot), 0)
        self._collection(collection).versions = fresh
        self.compactions += 1
        await self.store.commit(batch)
        for listener in list(self.epoch_listeners):
            listener(collection)

    # -- internals -------------------------------------------------------------------

    def _collection(self, collection: str) -> KvState | ServiceCatalog | DeviceRegistry | AclRegistry:
        if collection not in COLLECTIONS:
            raise KeyError(f"no collection {collection!r}")
        return getattr(self, collection)

    def _versions(self, collection: str) -> VersionedMap:
        return self._collection(collection).versions

    def _begin(self) -> WriteBatch:
        if self._open_group is not None:
            self._seal()  # earlier puts go first
        self._batch = WriteBatch()
        return self._batch

    def _close(self, batch: WriteBatch) -> Stamp | None:
        """Add the scope's counters to ``batch``; returns the own-write stamp it makes durable.

        Every write applied in memory so far is in this batch or an earlier
        one (they queue in order), so once it commits they are all durable.
        """
        batch.scope_state[self.name] = (self.index.value, self.kv.last_index, self.kv.conflicts)
        return self.clock.last

    async def _finish(
        self, batch: WriteBatch, collection: str, keys: set[str], origin: object = None
    ) -> None:
        own_stamp = self._close(batch)
        await self.store.commit(batch)
        self._committed(batch, collection, keys, origin, own_stamp)
        if origin is not None:
            self._last_remote_update = trio.current_time()
        await self._compact_if_needed(collection)

    def _committed(
        self, batch: WriteBatch, collection: str, keys: set[str], origin: object, own_stamp: Stamp | None
    ) -> None:
        """Tell the listeners about a durable batch."""
        self._durable_own_stamp = own_stamp
        for listener in list(self.listeners):
            listener(collection, keys)
        for scope, name, _epoch, update in batch.updates:
            if scope == self.name:
                for on_update in list(self.update_listeners):
                    on_update(name, update, origin)

    async def _compact_if_needed(self, collection: str) -> None:
        if not (self.auto_compact and self.needs_compaction(collection)):
            return
        streaming = trio.current_time() < self._last_remote_update + COMPACTION_QUIET_S
        if streaming and not self._stored_beyond(collection, 2):
            if collection not in self._compactions_waiting:
                self._compactions_waiting.add(collection)
                self.on_compaction_waiting()
            return
        self._compactions_waiting.discard(collection)
        await self.compact(collection)

    async def compact_when_quiet(self) -> None:
        """Run the compactions that wait for remote updates to pause (if still due then)."""
        while self._compactions_waiting:
            quiet_at = self._last_remote_update + COMPACTION_QUIET_S
            if trio.current_time() < quiet_at:
                await trio.sleep_until(quiet_at)
                continue
            for collection in sorted(self._compactions_waiting):
                self._compactions_waiting.discard(collection)
                await self._compact_if_needed(collection)

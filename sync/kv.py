"""Consul KV semantics on top of a :class:`VersionedMap`.

The replicated part is the versions map. Everything here that differs between
replicas is kept beside it, per replica and persisted with the same batch:

- ``CreateIndex``/``ModifyIndex``: Consul indexes are per replica (they come from
  this replica's change counter), so they live in ``kv_index``, not in the CRDT.
- history: superseded versions and conflict losers, at most ``history_depth`` per
  key, in ``kv_history``. Ordinary overwrites keep their metadata; conflict
  losers keep their value too, so a losing write is never silently gone.
  Rows that fall off the end are deleted from disk in bulk, ``TRIM_ROWS`` at a
  time: they are the oldest rows, so one bulk delete touches a few pages where
  one delete per put would dirty a page of its own in every commit. Until then
  (and after a crash) the disk may hold a few rows more than memory shows;
  ``load`` keeps only the newest ``history_depth`` and trims the rest later.
- TTL: a version carries its absolute expiry; a replica hides the key once its
  own clock passes it. Expiry changes no CRDT state, so it costs no sync traffic.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import cbor2
from sortedcontainers import SortedList

from .batch import HistoryChange, WriteBatch
from .errors import CasMissingKey, InvalidArgument
from .hlc import HybridClock, Stamp
from .limits import MAX_VALUE_BYTES, check_flags, check_key, check_prefix, check_value
from .quarantine import Quarantine
from .versioned import Version, VersionedMap


class KvEntry(NamedTuple):
    """A key as a read shows it. A tuple, not a dataclass: one is built per
    put, and a tuple is built in C (a frozen dataclass sets each field
    through ``object.__setattr__``)."""

    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    stamp: Stamp
    expires_ms: int | None = None
    lock_index: int = 0


class HistoryRecord(NamedTuple):
    """One past version of a key, as ``?history`` reports it (a tuple: see KvEntry)."""

    key: str
    stamp: Stamp
    op: str  # "set" or "delete"
    flags: int
    size: int
    conflict: bool  # lost a conflict against a concurrent write
    value: bytes | None  # kept for conflict losers


# Rows past history_depth deleted from disk together (see the module doc).
TRIM_ROWS = 256


class ScopeIndex:
    """The per-replica change counter of one scope (Consul's index).

    0 means nothing changed yet, and is reported as 1 (Consul never reports
    0: clients treat it as "no index"). So the first change is 2, not 1: a
    blocking query at the empty store's index 1 must wait for it, and see it.
    """

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def bump(self) -> int:
        self.value = max(self.value, 1) + 1
        return self.value


# A payload is CBOR ``[value, flags, expires_ms]`` (it starts with 0x83), or,
# for the usual write with no flags and no TTL, this byte and the value as it
# is: 4 bytes less per version in every document and frame, and no CBOR.
_PLAIN = 0x00
_PLAIN_PREFIX = bytes([_PLAIN])


def encode_payload(value: bytes, flags: int, expires_ms: int | None) -> bytes:
    if not flags and expires_ms is None:
        return _PLAIN_PREFIX + value
    return cbor2.dumps([value, flags, expires_ms])


def decode_payload(payload: bytes) -> tuple[bytes, int, int | None]:
    """``(value, flags, expires_ms)``; raises ValueError for a payload no writer makes."""
    if payload[:1] == _PLAIN_PREFIX:
        return payload[1:], 0, None
    value, flags, expires_ms = cbor2.loads(payload)
    if type(value) is not bytes or type(flags) is not int or not (expires_ms is None or type(expires_ms) is int):
        raise ValueError("a KV payload is [bytes, int, int or null]")
    if not 0 <= flags < 2**64 or len(value) > MAX_VALUE_BYTES:
        raise ValueError("a KV payload with flags outside 64 unsigned bits or a value over the size limit")
    return value, flags, expires_ms


# What an unreadable version reads as: no value, expired since the epoch, so
# every reader hides it the way it hides an expired key (see quarantine.py).
_UNREADABLE = (b"", 0, 0)


class KvState:
    """The KV store of one scope on one replica.

    Args:
        scope: the scope's name, the first column of every row written here.
        versions: the replicated versions of the scope's KV document.
        index: the scope's change counter, shared with the catalog.
        clock: issues write stamps and tells the wall time for TTLs.
        history_depth: past versions kept per key.
    """

    def __init__(
        self,
        scope: str,
        versions: VersionedMap,
        index: ScopeIndex,
        clock: HybridClock,
        history_depth: int = 16,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.scope = scope
        self.quarantine = quarantine if quarantine is not None else Quarantine(scope)
        self.versions = versions
        self.index = index
        self.clock = clock
        self.history_depth = history_depth
        self.last_index = 0  # index of the last change to any key
        self.conflicts = 0
        self._entries: dict[str, KvEntry] = {}
        self._sorted = SortedList()
        self._expiry_heap: list[tuple[int, str, Stamp]] = []
        # Per key, its past versions oldest first, as flat tuples (see _STAMP).
        self._history: dict[str, deque[tuple]] = {}
        self._conflict_stamps: set[tuple[str, Stamp]] = set()
        # History rows dropped from memory but still on disk: (key, encoded stamp).
        self._untrimmed: dict[tuple[str, str], None] = {}

    # -- loading -------------------------------------------------------------

    def load(
        self,
        index_rows: Iterable[tuple[str, int, int]],
        history_rows: Iterable[tuple[str, str, str, int, int, int, bytes | None]],
        conflicts: int,
        last_index: int,
    ) -> None:
        """Rebuild the per-replica view from the stored rows."""
        indexes = {key: (create, modify) for key, create, modify in index_rows}
        for key, stamp, op, flags, size, conflict, value in sorted(history_rows, key=lambda r: r[1]):
            flags %= 2**64  # stored as SQLite's signed 64-bit INTEGER
            self._remember(key, Stamp.decode(stamp), stamp, op, flags, size, bool(conflict), value)
        self.conflicts = conflicts
        self.last_index = last_index
        now = self.clock.wall_ms()
        for key in list(self.versions.keys()):
            entry = self._visible(key, now, indexes.get(key, (self.index.value,) * 2))
            if entry is not None:
                self._show(entry)

    # -- reading -------------------------------------------------------------

    def get(self, key: str) -> KvEntry | None:
        check_key(key)
        return self._entries.get(key)

    def list(self, prefix: str = "") -> list[KvEntry]:
        check_prefix(prefix)
        return [self._entries[k] for k in self._keys_from(prefix)]

    def keys(self, prefix: str = "", separator: str | None = None) -> list[str]:
        """Keys under ``prefix``; with a separator, cut after its first occurrence."""
        check_prefix(prefix)
        if not separator:
            return list(self._keys_from(prefix))
        found: list[str] = []
        for key in self._keys_from(prefix):
            cut = key.find(separator, len(prefix))
            short = key if cut < 0 else key[: cut + len(separator)]
            if not found or found[-1] != short:
                found.append(short)
        return found

    def history(self, key: str) -> list[HistoryRecord]:
        """Live versions (current first, then unresolved conflicts), then the past."""
        check_key(key)
        versions = self.versions.versions(key)
        live = [self._record(v, conflict=i > 0) for i, v in enumerate(versions)]
        # A conflict loser is recorded when it loses but stays live until a later
        # write supersedes it: list it once, as live.
        live_stamps = {v.stamp for v in versions}
        past = [_record_of(key, p) for p in self._history.get(key, ())]
        past = [r for r in past if r.stamp not in live_stamps]
        return live + sorted(past, key=lambda r: r.stamp, reverse=True)

    def __len__(self) -> int:
        return len(self._entries)

    def live_bytes(self) -> int:
        """Size of the live content: keys plus values."""
        return sum(len(k.encode()) + len(e.value) for k, e in self._entries.items())

    def next_expiry_ms(self) -> int | None:
        heap = self._expiry_heap
        while heap and self._stale_expiry(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expired_keys(self, now_ms: int) -> set[str]:
        """Keys whose current version's TTL has passed by ``now_ms``, hidden or not."""
        ended = set()
        for key, found in self.versions.live_items():
            stamp = max(found)
            payload = found[stamp]
            if payload is None or payload[0] == _PLAIN:
                continue  # a tombstone, or a value with no TTL
            _, _, expires = self._decode(key, stamp, payload)
            if expires is not None and expires <= now_ms:
                ended.add(key)
        return ended

    # -- writing -------------------------------------------------------------

    def put(
        self,
        key: str,
        value: bytes,
        batch: WriteBatch,
        *,
        flags: int = 0,
        cas: int | None = None,
        ttl_ms: int | None = None,
        stage: bool = False,
    ) -> bool:
        """Write a key; returns False when a check-and-set does not match.

        With ``stage``, the CRDT change waits for ``versions.flush()`` (the
        caller's job, before the batch is committed).
        """
        # The hot path of every write: the usual case inline, the rest in helpers.
        check_key(key)
        if len(value) > MAX_VALUE_BYTES:
            check_value(value)
        if flags or type(flags) is not int:
            check_flags(flags)
        if ttl_ms is not None and ttl_ms <= 0:
            raise InvalidArgument("a TTL must be positive")
        if cas is not None and not self._cas_matches(key, cas):
            return False
        stamp = self.clock.now()
        if ttl_ms:
            expires = self.clock.wall_ms() + ttl_ms  # this replica's clock: a stamp may carry a peer's time
            payload = encode_payload(value, flags, expires)
        else:
            expires = None
            payload = _PLAIN_PREFIX + value if not flags else encode_payload(value, flags, None)
        superseded = (self.versions.stage if stage else self.versions.write)(key, stamp, payload)
        index = self._next_index()
        old = self._entries.get(key)
        create = index if old is None else old.create_index
        self._show(KvEntry(key, value, flags, create, index, stamp, expires))
        side = batch.side_of(self.scope)
        side[0].append((key, create, index))
        if superseded:
            self._archive(superseded, side[1], shown=old)
        return True

    def delete(
        self, key: str, batch: WriteBatch, *, recurse: bool = False, cas: int | None = None
    ) -> bool:
        """Delete a key (or every key under a prefix); returns False on a CAS mismatch."""
        if recurse:
            check_prefix(key)
            doomed = list(self._keys_from(key))
        else:
            check_key(key)
            if not self._cas_matches(key, cas, deleting=True):
                return False
            doomed = [key] if key in self._entries else []
        if not doomed:
            return True
        stamp = self.clock.now()
        writes = []
        for name in doomed:
            writes.append((name, stamp, None))
        superseded = self.versions.write_many(writes)
        self._next_index()
        history = batch.side_of(self.scope)[1]
        for name in doomed:
            self._hide(name, batch)
            self._archive(superseded[name], history)
        return True

    def touch(self, key: str, batch: WriteBatch) -> bool:
        """Give a key a new ModifyIndex without a new version (False if it does not exist).

        For changes kept beside the replicated value, such as a lock released
        when its session ends (sessions.py): blocking readers of the key wake
        and see it, and no replica but this one hears of it.
        """
        entry = self._entries.get(key)
        if entry is None:
            return False
        index = self._next_index()
        self._entries[key] = entry._replace(modify_index=index)
        batch.side_of(self.scope)[0].append((key, entry.create_index, index))
        return True

    def apply_remote(self, update: bytes, batch: WriteBatch) -> set[str]:
        """Merge a remote update; returns the keys whose visible value changed."""
        touched, removed = self.versions.apply_update(update)
        for version in removed:
            self.clock.observe(version.stamp)
        self._archive(removed, batch.side_of(self.scope)[1])
        return self.refresh(touched, batch)

    def refresh(self, touched: Iterable[str], batch: WriteBatch) -> set[str]:
        """Bring the per-replica view of ``touched`` keys in line with the versions.

        Records conflicts (keys with more than one live version) and gives every
        key whose visible value changed the same new index.
        """
        now = self.clock.wall_ms()
        changed: set[str] = set()
        index = None
        live_of, entries, observe = self.versions.live, self._entries, self.clock.observe
        for key in touched:
            # Most keys hold one version: read it without building Version objects.
            found = live_of(key)
            if not found:
                stamp = payload = None
            elif len(found) == 1:
                ((stamp, payload),) = found.items()
            else:
                current, *losers = self.versions.versions(key)
                for loser in losers:
                    if self._record_conflict(loser, batch.side_of(self.scope)[1]) and index is None:
                        # A loser arriving after its winner changes nothing shown,
                        # but it is a change: ``?history`` and blocking queries
                        # read this index. (The entry keeps its ModifyIndex.)
                        index = self._next_index()
                stamp, payload = current.stamp, current.payload
            if stamp is not None:
                observe(stamp)
            old = entries.get(key)
            visible = None
            if payload is not None:
                if old is not None and old.stamp == stamp and (old.expires_ms is None or old.expires_ms > now):
                    continue  # shown already, and still live
                value, flags, expires = self._decode(key, stamp, payload)
                if expires is None or expires > now:
                    visible = (value, flags, expires)
            if visible is None and old is None:
                continue
            if index is None:
                index = self._next_index()
            changed.add(key)
            if visible is None:
                self._hide(key, batch)
            else:
                create = old.create_index if old else index
                self._show(KvEntry(key, value, flags, create, index, stamp, expires))
                batch.side_of(self.scope)[0].append((key, create, index))
        return changed

    def past_stamps(self, key: str) -> set[Stamp]:
        """Stamps of the versions of ``key`` this replica has seen superseded or lose (bounded)."""
        return {Stamp(*p[_STAMP]) for p in self._history.get(key, ())}

    def expire(self, now_ms: int, batch: WriteBatch) -> list[str]:
        """Hide the keys whose TTL has passed; returns them."""
        expired: list[str] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now_ms:
            item = heapq.heappop(heap)
            if not self._stale_expiry(item):
                expired.append(item[1])
        if expired:
            self._next_index()
            for key in expired:
                self._hide(key, batch)
        return expired

    # -- internals -----------------------------------------------------------

    def _cas_matches(self, key: str, cas: int | None, deleting: bool = False) -> bool:
        if cas is None:
            return True
        if cas < 0:
            raise InvalidArgument("cas is a non-negative index")
        entry = self._entries.get(key)
        if cas == 0:
            return entry is None and not deleting
        if entry is None:
            advice = "nothing to delete" if deleting else "use cas=0 to create it"
            raise CasMissingKey(f"key {key!r} does not exist, so cas={cas} cannot match; {advice}")
        return entry.modify_index == cas

    def _next_index(self) -> int:
        self.last_index = self.index.bump()
        return self.last_index

    def _visible(self, key: str, now_ms: int, indexes: tuple[int, int]) -> KvEntry | None:
        current = self.versions.current(key)
        if current is None or current.deleted:
            return None
        value, flags, expires = self._decode(key, current.stamp, current.payload)
        if expires is not None and expires <= now_ms:
            return None
        return KvEntry(key, value, flags, indexes[0], indexes[1], current.stamp, expires)

    def _decode(self, key: str, stamp: Stamp, payload: bytes) -> tuple[bytes, int, int | None]:
        found = self.quarantine.decode(decode_payload, payload, "kv", key, stamp)
        return _UNREADABLE if found is None else found

    def _show(self, entry: KvEntry) -> None:
        if entry.key not in self._entries:
            self._sorted.add(entry.key)
        self._entries[entry.key] = entry
        if entry.expires_ms is not None:
            heapq.heappush(self._expiry_heap, (entry.expires_ms, entry.key, entry.stamp))

    def _hide(self, key: str, batch: WriteBatch) -> None:
        if self._entries.pop(key, None) is not None:
            self._sorted.remove(key)
            batch.side_of(self.scope)[0].append((key,))

    def _stale_expiry(self, item: tuple[int, str, Stamp]) -> bool:
        entry = self._entries.get(item[1])
        return entry is None or entry.stamp != item[2]

    def _keys_from(self, prefix: str):
        for key in self._sorted.irange(minimum=prefix):
            if not key.startswith(prefix):
                break
            yield key

    def _record(self, version: Version, conflict: bool) -> HistoryRecord:
        if version.deleted:
            return HistoryRecord(version.key, version.stamp, "delete", 0, 0, conflict, None)
        value, flags, _ = self._decode(version.key, version.stamp, version.payload)
        return HistoryRecord(version.key, version.stamp, "set", flags, len(value), conflict, value)

    def _record_conflict(self, loser: Version, history: list[HistoryChange]) -> bool:
        """Record a conflict loser once; returns whether it was new."""
        if (loser.key, loser.stamp) in self._conflict_stamps:
            return False
        self.conflicts += 1
        self._store_record(self._record(loser, conflict=True), history)
        return True

    def _archive(
        self, superseded: Iterable[Version], history: list[HistoryChange], shown: KvEntry | None = None
    ) -> None:
        """Keep superseded versions' metadata; ``shown`` is the entry visible before."""
        conflict_stamps = self._conflict_stamps
        for version in superseded:
            if conflict_stamps and (version.key, version.stamp) in conflict_stamps:
                continue  # already kept, with its value, when it lost
            if shown is not None and shown.stamp == version.stamp:
                # The visible entry holds this version decoded: skip the CBOR.
                self._store_history(
                    version.key, version.stamp, "set", shown.flags, len(shown.value), False, None, history
                )
            else:
                self._store_record(self._record(version, conflict=False)._replace(value=None), history)

    def _store_record(self, record: HistoryRecord, history: list[HistoryChange]) -> None:
        self._store_history(
            record.key, record.stamp, record.op, record.flags, record.size, record.conflict, record.value, history
        )

    def _store_history(
        self,
        key: str,
        stamp: Stamp,
        op: str,
        flags: int,
        size: int,
        conflict: bool,
        value: bytes | None,
        history: list[HistoryChange],
    ) -> None:
        """Keep a past version in memory and append its row to ``history`` (a batch's)."""
        text = stamp.encode()
        history.append((key, text, op, _signed64(flags), size, int(conflict), value))
        untrimmed = self._untrimmed
        if untrimmed:
            # A row stored again is wanted again: its pending delete must not win.
            untrimmed.pop((key, text), None)
        self._remember(key, stamp, text, op, flags, size, conflict, value)
        if len(untrimmed) >= TRIM_ROWS:
            history.extend((key, old) for key, old in untrimmed)
            untrimmed.clear()

    def _remember(
        self,
        key: str,
        stamp: Stamp,
        text: str,
        op: str,
        flags: int,
        size: int,
        conflict: bool,
        value: bytes | None,
    ) -> None:
        """Keep a past version in memory; the one that falls off the end is deleted from disk later."""
        past = self._history.get(key)
        if past is None:
            past = self._history[key] = deque()
        if conflict:
            self._conflict_stamps.add((key, stamp))
        # A flat tuple of plain values (see _STAMP): the garbage collector stops
        # tracking it at its first pass, where a record holding a Stamp stays
        # tracked for good, and it is half the memory.
        past.append((text, *stamp, op, flags, size, conflict, value))
        if len(past) <= self.history_depth:
            return
        oldest = past.popleft()  # records arrive in (near) stamp order
        if self._conflict_stamps:
            self._conflict_stamps.discard((key, Stamp(*oldest[_STAMP])))
        self._untrimmed[(key, oldest[0])] = None


# A past version in memory: (stamp as its row stores it, wall_ms, counter,
# replica, op, flags, size, conflict, value).
_STAMP = slice(1, 4)


def _record_of(key: str, past: tuple) -> HistoryRecord:
    _text, wall, counter, replica, op, flags, size, conflict, value = past
    return HistoryRecord(key, Stamp(wall, counter, replica), op, flags, size, conflict, value)


def _signed64(flags: int) -> int:
    """Flags (unsigned 64-bit) as SQLite's signed INTEGER; ``load`` undoes it."""
    return flags - 2**64 if flags >= 2**63 else flags

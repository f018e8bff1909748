"""A last-writer-wins register map whose conflicts stay visible.

Theory of operation
-------------------
A pycrdt ``Map`` resolves concurrent sets of one key by client id, and the
losing value disappears without an event (DESIGN.md, decision 7). So we never
set a user's key directly. Each write adds a *version*: an entry whose map key
is ``<user key> NUL <stamp>`` and whose value is an opaque payload (bytes). In
the same transaction it deletes every version of that user key it can see, i.e.
the versions it supersedes.

Two replicas that write one key concurrently each delete only what they saw,
so after they exchange updates both new versions survive everywhere. Every
replica then reads the version with the highest stamp as the current one and
the others as conflict losers, until a later write deletes them all. A delete
is a version too (a tombstone, payload ``None``), so a concurrent older write
can never bring a value back.

User keys never contain NUL (the key rules forbid it), so the split is exact.

Version ids name their stamp in the compact form (``Stamp.compact``, 16
characters). Documents written before it hold ids with the long form (30
characters); they are read as they are, and removing such a version names its
id exactly as the document has it (``_legacy_ids``). Compaction rewrites them
in the compact form.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import NamedTuple

from pycrdt import Doc, Map, Transaction

from .hlc import Stamp

_SEP = "\x00"
_TOMBSTONE = b""  # an empty payload marks a delete; live payloads are never empty


class Version(NamedTuple):
    """One version of a key (a tuple, built in C: see ``kv.KvEntry``)."""

    key: str
    stamp: Stamp
    payload: bytes | None  # None for a tombstone

    @property
    def deleted(self) -> bool:
        return self.payload is None


def ignore_update(update: bytes) -> None:
    """An ``on_update`` for a document built aside, until it takes its place."""


def _entry_size(key: str, payload: bytes | None) -> int:
    return len(key) + _STAMP_CHARS + (len(payload) if payload else 0)


_STAMP_CHARS = 18  # a compact stamp (16 characters, 18 with a 3-digit counter) and NUL, rounded up


def version_id(key: str, stamp: Stamp) -> str:
    """The map key of a new version: the stamp in its compact form."""
    return f"{key}{_SEP}{stamp.compact()}"


def parse_version_id(vid: str) -> tuple[str, Stamp]:
    """Key and stamp of a version id, in either stamp form."""
    key, stamp = vid.split(_SEP, 1)
    return key, Stamp.decode(stamp)


class VersionedMap:
    """The versions of one collection, kept in one pycrdt document.

    Args:
        doc: the document; the versions live in its root map ``versions``.
        on_update: called with the binary update of every transaction, local
            or remote, so the caller can persist and forward it.
    """

    def __init__(self, doc: Doc, on_update: Callable[[bytes], None]) -> None:
        self.doc = doc
        self._map: Map = doc.get("versions", type=Map)
        self._live: dict[str, dict[Stamp, bytes | None]] = {}
        self._touched: set[str] = set()
        self._removed: list[Version] = []
        # Staged writes (see stage()): version ids to remove from the document
        # and versions to insert, applied together by flush().
        self._staged_removes: list[str] = []
        self._staged_inserts: dict[str, bytes] = {}
        # Ids of live versions whose text is not version_id(key, stamp): the
        # long stamp form of older documents.
        self._legacy_ids: dict[tuple[str, Stamp], str] = {}
        # Bytes the live versions need in a fresh document (ids plus payloads):
        # what compaction would shrink the document to.
        self.live_bytes = 0
        for vid, payload in self._map.items():
            self._add(vid, payload)
        self.on_update = on_update
        self._doc_sub = doc.observe(lambda event: self.on_update(event.update))

    # -- reading -----------------------------------------------------------

    def keys(self) -> Iterator[str]:
        return iter(self._live)

    def versions(self, key: str) -> list[Version]:
        """Every live version of ``key``, the current one first."""
        found = self._live.get(key)
        if not found:
            return []
        if len(found) == 1:  # the usual case: no unresolved conflict, nothing to sort
            ((stamp, payload),) = found.items()
            return [Version(key, stamp, payload)]
        return [Version(key, s, p) for s, p in sorted(found.items(), reverse=True)]

    def live_items(self) -> Iterable[tuple[str, dict[Stamp, bytes | None]]]:
        """Every key with its live versions by stamp, unordered; read, never change them."""
        return self._live.items()

    def live(self, key: str) -> dict[Stamp, bytes | None] | None:
        """The live versions of ``key`` by stamp, unordered; read, never change it."""
        return self._live.get(key)

    def current(self, key: str) -> Version | None:
        found = self._live.get(key)
        if not found:
            return None
        stamp = max(found)
        return Version(key, stamp, found[stamp])

    def all_versions(self) -> Iterator[Version]:
        for key, found in self._live.items():
            for stamp, payload in found.items():
                yield Version(key, stamp, payload)

    # -- writing -----------------------------------------------------------

    def write(self, key: str, stamp: Stamp, payload: bytes | None) -> list[Version]:
        """Add a version of ``key`` that supersedes every version seen here.

        Returns the superseded versions, the current one first.
        """
        with self.doc.transaction() as txn:
            superseded = self.stage(key, stamp, payload)
            self._flush(txn)
            return superseded

    def write_many(
        self, writes: Iterable[tuple[str, Stamp, bytes | None]]
    ) -> dict[str, list[Version]]:
        """Several writes in one transaction (one update, one durable record)."""
        with self.doc.transaction() as txn:
            superseded = {key: self.stage(key, stamp, payload) for key, stamp, payload in writes}
            self._flush(txn)
            return superseded

    def stage(
        self, key: str, stamp: Stamp, payload: bytes | None, superseded: list[Version] | None = None
    ) -> list[Version]:
        """Like :meth:`write`, but the document changes only at :meth:`flush`.

        The view (``versions``, ``current``, ...) shows the write at once. Many
        staged writes then cost one transaction and one update between them. A
        version staged and superseded before the flush never reaches the
        document, as if it had been inserted and removed in one update.
        ``superseded`` names the versions it supersedes when not all of them.
        """
        # Every put runs this: the view's code inline (see _add and _remove).
        live = self._live.get(key)
        if live is None:
            live = self._live[key] = {}
        if superseded is not None:
            old = superseded
        elif len(live) == 1:  # the usual case: one version to supersede
            ((seen, seen_payload),) = live.items()
            old = [Version(key, seen, seen_payload)]
        else:
            old = self.versions(key)
        inserts, removes = self._staged_inserts, self._staged_removes
        size = self.live_bytes
        for version in old:
            vid = self._existing_id(key, version.stamp)
            if inserts.pop(vid, None) is None:
                removes.append(vid)
            del live[version.stamp]
            size -= _entry_size(key, version.payload)
        inserts[version_id(key, stamp)] = _TOMBSTONE if payload is None else payload
        # Local writes keep the view in step directly; the map observer
        # (costly: it converts every event) runs only for remote updates.
        live[stamp] = payload
        self.live_bytes = size + _entry_size(key, payload)
        return old

    def flush(self) -> None:
        """Apply the staged writes to the document, in one transaction."""
        if self._staged_inserts or self._staged_removes:
            with self.doc.transaction() as txn:
                self._flush(txn)

    def _flush(self, txn: Transaction) -> None:
        if not (self._staged_inserts or self._staged_removes):
            return
        # pycrdt's Map item methods each open a nested transaction and look the
        # key up again, which costs as much as the change itself. Within our
        # transaction, and for entries the view says exist, call the native map.
        native, raw_txn = self._map.integrated, txn._txn
        for vid in self._staged_removes:
            native.remove(raw_txn, vid)
        for vid, payload in self._staged_inserts.items():
            native.insert(raw_txn, vid, payload)
        self._staged_removes, self._staged_inserts = [], {}

    def rebuilt(self, ended: Collection[str] = ()) -> VersionedMap:
        """A fresh document with this map's live versions and nothing else (a new epoch).

        A key in ``ended`` keeps only a tombstone with its current version's
        stamp. The new map reports its updates to nobody until its
        ``on_update`` is set. It takes over this map's view: write only to it
        from then on. Built from the view in one transaction, with no
        :class:`Version` objects: compaction runs this for every key, about
        once per thousand puts in a busy scope.
        """
        fresh = VersionedMap(Doc(), ignore_update)
        self.flush()
        live, live_bytes = fresh._live, self.live_bytes
        with fresh.doc.transaction() as txn:
            native, raw_txn = fresh._map.integrated, txn._txn  # see _flush
            for key, found in self._live.items():
                if key in ended:
                    for payload in found.values():
                        live_bytes -= _entry_size(key, payload)
                    found = {max(found): None}
                    live_bytes += _entry_size(key, None)
                # Otherwise the per-key dict moves to the fresh map as it is: this
                # map is replaced by it, and a thousand copies a compaction were
                # a thousand new objects for the garbage collector.
                live[key] = found
                for stamp, payload in found.items():
                    native.insert(raw_txn, version_id(key, stamp), _TOMBSTONE if payload is None else payload)
        fresh.live_bytes = live_bytes
        return fresh

    def merge_version(self, version: Version, saw: Callable[[Version], bool]) -> None:
        """Bring a version from another document (an older epoch) into this one.

        It supersedes only the versions of its key with earlier stamps that
        ``saw`` says its writer had seen; the others were concurrent with it and
        stay, so the later stamp still wins and the loser stays readable, as
        when two replicas exchange updates. A version already here changes
        nothing.
        """
        if version.stamp in self._live.get(version.key, ()):
            return
        seen = [v for v in self.versions(version.key) if v.stamp < version.stamp and saw(v)]
        with self.doc.transaction() as txn:
            self.stage(version.key, version.stamp, version.payload, seen)
            self._flush(txn)

    def apply_update(self, update: bytes) -> tuple[set[str], list[Version]]:
        """Merge an update from another replica.

        Returns the user keys it touched and the versions it removed (those the
        remote writer superseded).
        """
        self.flush()
        self._touched, self._removed = set(), []
        subscription = self._map.observe(self._on_map_event)
        try:
            self.doc.apply_update(update)
        finally:
            self._map.unobserve(subscription)
        touched, removed = self._touched, self._removed
        self._touched, self._removed = set(), []
        return touched, removed

    # -- internals ---------------------------------------------------------

    def _on_map_event(self, event) -> None:
        for vid, change in event.keys.items():
            if change["action"] == "delete":
                self._remove(vid)
            else:
                self._add(vid, change["newValue"])

    def _existing_id(self, key: str, stamp: Stamp) -> str:
        """The id of a live version, as the document has it (to remove it)."""
        if self._legacy_ids:
            found = self._legacy_ids.pop((key, stamp), None)
            if found is not None:
                return found
        return version_id(key, stamp)

    def _add(self, vid: str, raw: bytes | bytearray) -> None:
        key, text = vid.split(_SEP, 1)
        stamp = Stamp.decode(text)
        if "." in text and stamp.compact() != text:
            self._legacy_ids[(key, stamp)] = vid
        payload = bytes(raw) if raw else None
        found = self._live.setdefault(key, {})
        if stamp not in found:
            self.live_bytes += _entry_size(key, payload)
        found[stamp] = payload
        self._touched.add(key)

    def _remove(self, vid: str) -> None:
        key, stamp = parse_version_id(vid)
        if self._legacy_ids:
            self._legacy_ids.pop((key, stamp), None)
        found = self._live.get(key)
        if found is not None and stamp in found:
            payload = found.pop(stamp)
            self.live_bytes -= _entry_size(key, payload)
            self._removed.append(Version(key, stamp, payload))
            if not found:
                del self._live[key]
        self._touched.add(key)

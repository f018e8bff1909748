"""Collections of whole records (services, devices) over a :class:`VersionedMap`.

KV has its own, richer view (indexes, history, TTL); record collections only
need to merge remote updates, count conflicts, and give every change an index.
"""

from __future__ import annotations

from .batch import WriteBatch
from .hlc import HybridClock, Stamp
from .kv import ScopeIndex
from .quarantine import Quarantine
from .versioned import VersionedMap


class RecordCollection:
    """Shared behaviour of the catalog and the device registry."""

    collection = ""  # its name in the store and in quarantine reports

    def __init__(
        self, versions: VersionedMap, index: ScopeIndex, clock: HybridClock, quarantine: Quarantine | None = None
    ) -> None:
        self.versions = versions
        self.quarantine = quarantine if quarantine is not None else Quarantine("?")
        self.index = index
        self.clock = clock
        self.last_index = 0
        self.conflicts = 0
        self._losers: set[tuple[str, Stamp]] = set()

    def apply_remote(self, update: bytes, batch: WriteBatch) -> set[str]:
        """Merge a remote update; returns the record keys it touched."""
        touched, removed = self.versions.apply_update(update)
        for version in removed:
            self.clock.observe(version.stamp)
        for key in touched:
            live = self.versions.versions(key)
            if live:
                self.clock.observe(live[0].stamp)
            for loser in live[1:]:
                # Each losing version counts once, however often its key is touched.
                if (key, loser.stamp) not in self._losers:
                    self._losers.add((key, loser.stamp))
                    self.conflicts += 1
        if touched:
            self._changed(batch)
        return touched

    def _changed(self, batch: WriteBatch) -> None:
        self.last_index = self.index.bump()

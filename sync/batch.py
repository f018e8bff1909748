"""What changes ask the store to make durable, in a form that coalesces.

A change fills a :class:`WriteBatch` while it is applied in memory. The store
merges every batch of a commit round into one and writes each table with one
``executemany``: a round of 64 puts costs a handful of statements, not a few
hundred.

A scope's ``kv_index`` and ``kv_history`` changes are kept as they are stored
(``tables`` writes them as one CBOR value per round): lists appended in the
order they were made, where a later row for the same key (or key and stamp)
replaces an earlier one when they are read back. A put appends two tuples
instead of building dictionary keys that the writer thread would only take
apart again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# (key, create_index, modify_index), or (key,) to delete the row (lists once read back)
IndexChange = tuple | list
# (key, stamp, op, flags, size, conflict, value), or (key, stamp) to delete the row
HistoryChange = tuple | list
# A scope's changes to its kv_index and kv_history rows, in the order made.
SideChanges = tuple[list[IndexChange], list[HistoryChange]]


@dataclass(slots=True)
class WriteBatch:
    """Rows to write together; see ``tables.SCHEMA`` for the tables."""

    updates: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    side: dict[str, SideChanges] = field(default_factory=dict)
    scope_state: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    snapshots: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.updates or self.snapshots or self.meta
            or any(index or history for index, history in self.side.values())
        )

    def side_of(self, scope: str) -> SideChanges:
        """The lists a scope appends its kv_index and kv_history changes to."""
        found = self.side.get(scope)
        if found is None:
            found = self.side[scope] = ([], [])
        return found

    @staticmethod
    def combine(batches: list[WriteBatch]) -> WriteBatch:
        """One batch with the rows of ``batches`` (in order); a lone batch as it is."""
        if len(batches) == 1:
            return batches[0]
        merged = WriteBatch()
        for batch in batches:
            merged.merge(batch)
        return merged

    def merge(self, later: WriteBatch) -> None:
        """Fold ``later`` into this batch, as if it ran after it."""
        self.updates.extend(later.updates)
        for scope, (index, history) in later.side.items():
            mine = self.side_of(scope)
            mine[0].extend(index)
            mine[1].extend(history)
        self.scope_state.update(later.scope_state)
        self.snapshots.update(later.snapshots)
        self.meta.update(later.meta)

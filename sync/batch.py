"""What changes ask the store to make durable, in a form that coalesces.

A change fills a :class:`WriteBatch` while it is applied in memory. The store
merges every batch of a commit round into one (later rows for the same primary
key replace earlier ones) and writes each table with one ``executemany``: a
round of 64 puts costs a handful of statements, not a few hundred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# (scope, key) -> (create_index, modify_index), or None to delete the row
KvIndexRows = dict[tuple[str, str], "tuple[int, int] | None"]
# (scope, key, stamp) -> (op, flags, size, conflict, value), or None to delete
HistoryRows = dict[tuple[str, str, str], "tuple[str, int, int, int, bytes | None] | None"]


@dataclass(slots=True)
class WriteBatch:
    """Rows to write together; see ``tables.SCHEMA`` for the tables."""

    updates: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    kv_index: KvIndexRows = field(default_factory=dict)
    history: HistoryRows = field(default_factory=dict)
    scope_state: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    snapshots: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.updates or self.kv_index or self.history or self.snapshots or self.meta
        )

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
        self.kv_index.update(later.kv_index)
        self.history.update(later.history)
        self.scope_state.update(later.scope_state)
        self.snapshots.update(later.snapshots)
        self.meta.update(later.meta)

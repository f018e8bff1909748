"""Stored values that a reader cannot decode: set aside and reported, never fatal.

Every value in the store was checked when it was written here, but a value can
also arrive through sync from a peer that did not check it (an older agent, a
hostile one), or have been written before a limit existed. A reader that meets
such a value must not fail: one bad value once made an edge exit on every
start (DESIGN.md, decision 8). So each reader decodes through
:meth:`Quarantine.decode`: a value that does not decode is treated as absent,
recorded here with the reason and a prefix of its bytes, logged once, and shown
in ``/v1/sync/status`` and ``/metrics``. Nothing is deleted: a later write to
the key supersedes the bad version as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("konsul.sync")

T = TypeVar("T")
MAX_ENTRIES = 1000  # reported entries per scope; the count goes on past it
SAMPLE_BYTES = 64


class Quarantine:
    """The undecodable stored values of one scope."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.count = 0
        self._entries: dict[tuple[str, str, str], dict[str, Any]] = {}

    def decode(self, decoder: Callable[[bytes], T], payload: bytes, collection: str, key: str, stamp: object) -> T | None:
        """``decoder(payload)``, or None (and an entry here) if it raises."""
        try:
            return decoder(payload)
        except Exception as error:  # noqa: BLE001 - any failure of a reader is the value's fault
            self.add(collection, key, stamp, f"{type(error).__name__}: {error}", payload)
            return None

    def add(self, collection: str, key: str, stamp: object, reason: str, payload: bytes = b"") -> None:
        stamp = stamp.encode() if hasattr(stamp, "encode") else str(stamp)
        name = (collection, key, stamp)
        if name in self._entries:
            return
        self.count += 1
        if len(self._entries) < MAX_ENTRIES:
            self._entries[name] = {
                "Collection": collection,
                "Key": key,
                "Stamp": stamp,
                "Reason": reason[:200],
                "Size": len(payload),
                "Head": bytes(payload[:SAMPLE_BYTES]).hex(),
            }
        log.warning(
            "scope %s: the stored %s value of %r (version %s) cannot be read and is treated as absent: %s",
            self.scope, collection, key, stamp, reason[:200],
        )

    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries.values())

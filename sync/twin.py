"""Device twins: desired and reported state, merged field by field.

A twin is two JSON objects per device: *desired* (what users and the hub ask
of the device) and *reported* (what the device says it is). Both live in the
device registry's document, one version per top-level field, under the keys
``desired/<device>/<field>`` and ``reported/<device>/<field>``. Each field is
then a last-writer-wins register of its own (``versioned.py``), which gives
the merge the twin promises:

- concurrent changes to different fields merge, since they are different keys;
- concurrent changes to one field resolve to the later stamp on every replica,
  and the losing value stays a live version, readable as a conflict, until a
  later write to the field supersedes it;
- removing a field writes a tombstone, so an older concurrent value never
  comes back.

A field's value is any JSON value (an object is replaced whole: merging is by
top-level field). Only fields whose value changes are written, so a device
that reports the same state every minute adds nothing to the document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cbor2

from .errors import InvalidArgument, ValueTooLarge
from .hlc import HybridClock, Stamp
from .limits import check_document as check_structure, decode_cbor_document
from .quarantine import Quarantine
from .versioned import Version, VersionedMap

SIDES = ("desired", "reported")
MAX_FIELD_NAME = 256
MAX_TWIN_BYTES = 64 * 1024  # one side of one device's twin, encoded


@dataclass(frozen=True, slots=True)
class TwinConflict:
    """A concurrent write to a twin field that lost to a later one."""

    side: str
    field: str
    value: Any
    stamp: Stamp
    deleted: bool


def twin_key(side: str, device_id: str, name: str) -> str:
    return f"{side}/{device_id}/{name}"


def parse_twin_key(key: str) -> tuple[str, str, str] | None:
    """``(side, device, field)`` for a twin key, None for any other registry key."""
    side, sep, rest = key.partition("/")
    if not sep or side not in SIDES:
        return None
    device_id, sep, name = rest.partition("/")  # device ids never contain '/'
    return (side, device_id, name) if sep else None


def check_document(document: Any, what: str) -> dict[str, Any]:
    """A twin document: a JSON object with sane field names, within the size limit."""
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} state is a JSON object of fields")
    check_structure(document, f"{what} state")  # depth, numbers, keys: the rules every document follows
    for name in document:
        if not isinstance(name, str) or not name or len(name) > MAX_FIELD_NAME or "\x00" in name:
            raise InvalidArgument(f"a {what} field name is 1-{MAX_FIELD_NAME} characters, no NUL")
    try:
        size = len(cbor2.dumps(document))
    except (TypeError, ValueError, cbor2.CBOREncodeError) as error:
        raise InvalidArgument(f"{what} state holds a value that is not JSON: {error}") from None
    if size > MAX_TWIN_BYTES:
        raise ValueTooLarge(f"{what} state of {size} bytes exceeds {MAX_TWIN_BYTES}")
    return document


class TwinView:
    """The twins in one device registry document.

    Args:
        versions: returns the registry's current :class:`VersionedMap` (it is
            replaced when the document is compacted or a hub epoch is adopted).
        clock: stamps local writes.
    """

    def __init__(self, versions: Any, clock: HybridClock, quarantine: Quarantine | None = None) -> None:
        self._versions = versions
        self.clock = clock
        self.quarantine = quarantine if quarantine is not None else Quarantine("?")
        self._indexed: VersionedMap | None = None
        self._fields: dict[tuple[str, str], set[str]] = {}  # (side, device) -> field names

    # -- reading -----------------------------------------------------------------

    def document(self, side: str, device_id: str) -> dict[str, Any]:
        """The side's current fields (tombstoned fields absent)."""
        versions = self._map()
        found = {}
        for name in sorted(self._fields.get((side, device_id), ())):
            current = versions.current(twin_key(side, device_id, name))
            if current is not None and not current.deleted:
                value = self._read(current)
                if value is not None:  # None is never stored: a removed field is a tombstone
                    found[name] = value
        return found

    def delta(self, device_id: str) -> dict[str, Any]:
        """Desired fields the device has not reported yet (with their desired value)."""
        reported = self.document("reported", device_id)
        return {
            name: value
            for name, value in self.document("desired", device_id).items()
            if name not in reported or not same_value(reported[name], value)
        }

    def conflicts(self, device_id: str) -> list[TwinConflict]:
        versions = self._map()
        found = []
        for side in SIDES:
            for name in sorted(self._fields.get((side, device_id), ())):
                for loser in versions.versions(twin_key(side, device_id, name))[1:]:
                    value = None if loser.deleted else self._read(loser)
                    found.append(TwinConflict(side, name, value, loser.stamp, loser.deleted))
        return found

    def devices(self, side: str) -> list[str]:
        """Devices with at least one field ever written on ``side``."""
        self._map()
        return sorted(device for s, device in self._fields if s == side)

    def has_side(self, side: str, device_id: str) -> bool:
        """Whether any field of the device's ``side`` was ever written (removed ones count)."""
        self._map()
        return (side, device_id) in self._fields

    # -- writing -------------------------------------------------------------------

    def changes(self, side: str, device_id: str, document: dict[str, Any], replace: bool) -> dict[str, Any]:
        """The field writes that turn the current side into ``document``.

        With ``replace`` the result is exactly ``document``; else ``document``
        is a merge patch (RFC 7386 at the top level: ``None`` removes a field).
        Fields already holding the value are left out.
        """
        current = self.document(side, device_id)
        wanted = dict(document)
        if replace:
            for name in current:
                wanted.setdefault(name, None)
        return {
            name: value
            for name, value in wanted.items()
            if (value is None and name in current)
            or (value is not None and (name not in current or not same_value(current[name], value)))
        }

    def write(self, side: str, device_id: str, changes: dict[str, Any]) -> set[str]:
        """Write each changed field as a new version; returns the registry keys touched."""
        versions = self._map()
        writes = []
        for name, value in changes.items():
            payload = None if value is None else cbor2.dumps(value)
            writes.append((twin_key(side, device_id, name), self.clock.now(), payload))
        versions.write_many(writes)
        self.note(key for key, _stamp, _payload in writes)
        return {key for key, _stamp, _payload in writes}

    def clear(self, device_id: str) -> set[str]:
        """Remove every field of both sides (the device was deleted)."""
        touched: set[str] = set()
        for side in SIDES:
            changes = {name: None for name in self.document(side, device_id)}
            if changes:
                touched |= self.write(side, device_id, changes)
        return touched

    def note(self, keys: Iterable[str]) -> None:
        """Keep the field index in step with keys written or merged."""
        self._map()
        for key in keys:
            parsed = parse_twin_key(key)
            if parsed is not None:
                side, device_id, name = parsed
                self._fields.setdefault((side, device_id), set()).add(name)

    # -- internals -----------------------------------------------------------------

    def _read(self, version: Version) -> Any:
        """A stored field value, or None if it cannot be read (see quarantine.py)."""
        return self.quarantine.decode(decode_cbor_document, version.payload, "devices", version.key, version.stamp)

    def _map(self) -> VersionedMap:
        versions = self._versions()
        if versions is not self._indexed:
            self._indexed = versions
            self._fields = {}
            for key in versions.keys():
                parsed = parse_twin_key(key)
                if parsed is not None:
                    side, device_id, name = parsed
                    self._fields.setdefault((side, device_id), set()).add(name)
        return versions


def same_value(a: Any, b: Any) -> bool:
    """JSON equality: ``2`` and ``2.0`` are the same number, ``1`` and ``true`` are not."""
    return _comparable(a) == _comparable(b)


def _comparable(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, (int, float)):
        return ("number", value)  # Python compares 2 == 2.0
    if isinstance(value, dict):
        return ("object", frozenset((k, _comparable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("array", tuple(_comparable(v) for v in value))
    return ("other", value)


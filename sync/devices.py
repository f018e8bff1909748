"""The device registry of one scope: durable device records as CRDT versions.

A record holds what users author and what must survive: id, type, tags,
attributes, firmware version, the hash of the device's token, which KV
prefixes it may read and write (shorthands for ACL rules), the IDs of the ACL
policies it links (docs/acl.md, "Devices as principals"), the Sender ID of
its OSCORE context if it has one (never the secret), and when it was created. Presence (online,
last seen, protocol, address) churns and lives in :class:`PresenceTable`,
out of the CRDT (DESIGN.md, decision 5).

Tokens are random, shown once when a device is created, and stored only as
SHA-256 hashes: a token has 256 bits of entropy, so a slow password hash
would add cost and no safety.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2

from .batch import WriteBatch
from .errors import InvalidArgument, NotFound
from .hlc import Stamp
from .records import RecordCollection
from .twin import TwinView

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_KV_READ = ("",)  # the whole keyspace, read-only
PROTOCOLS = ("mqtt", "coap", "http")
MAX_POLICY_LINKS = 256  # as an ACL token (sync/acl.py)
_POLICY_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise InvalidArgument(
            "a device id is 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return device_id


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    type: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)
    firmware: str = ""
    token_hash: str = ""
    kv_read: tuple[str, ...] = DEFAULT_KV_READ
    kv_write: tuple[str, ...] = ()
    created_ms: int = 0
    stamp: Stamp | None = None
    # ACL policy IDs (names are resolved when written); last, and absent from
    # records written before devices linked policies.
    policy_ids: tuple[str, ...] = ()
    # The OSCORE Sender ID (hex) of the device's security context, if one was
    # provisioned (protocols/oscore_contexts.py). Only the ID: the master
    # secret never enters the record, it stays on the edge that serves the
    # device. A context is used only while the record names its ID, so
    # rotating or deleting the record ends the old one on every replica.
    oscore_id: str = ""

    def to_payload(self) -> bytes:
        return cbor2.dumps(
            {
                "id": self.device_id,
                "type": self.type,
                "tags": list(self.tags),
                "attributes": self.attributes,
                "firmware": self.firmware,
                "token_hash": self.token_hash,
                "kv_read": list(self.kv_read),
                "kv_write": list(self.kv_write),
                "created": self.created_ms,
                "policies": list(self.policy_ids),
                # Written only when set, so records without OSCORE encode as before.
                **({"oscore": self.oscore_id} if self.oscore_id else {}),
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> DeviceRecord:
        data = cbor2.loads(payload)
        record = cls(
            data["id"],
            data["type"],
            tuple(data["tags"]),
            dict(data["attributes"]),
            data["firmware"],
            data["token_hash"],
            tuple(data["kv_read"]),
            tuple(data["kv_write"]),
            data["created"],
            stamp,
            tuple(data.get("policies", ())),
            data.get("oscore", ""),
        )
        strings = (
            record.device_id, record.type, record.firmware, record.token_hash, record.oscore_id,
            *record.tags, *record.kv_read, *record.kv_write, *record.policy_ids,
        )
        if not all(type(s) is str for s in strings) or type(record.created_ms) is not int:
            raise ValueError("a device record whose fields have the wrong types")
        return record

    def may_read(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.kv_read + self.kv_write)

    def may_write(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.kv_write)


class DeviceRegistry(RecordCollection):
    """Device records and twins (``twin.py``) of one scope on one replica."""

    collection = "devices"

    def __init__(self, versions, index, clock, quarantine=None) -> None:
        super().__init__(versions, index, clock, quarantine)
        self.twin = TwinView(lambda: self.versions, clock, self.quarantine)

    def apply_remote(self, update: bytes, batch: WriteBatch) -> set[str]:
        touched = super().apply_remote(update, batch)
        self.twin.note(touched)
        return touched

    def write_twin(self, side: str, device_id: str, document: dict, replace: bool, batch: WriteBatch) -> set[str]:
        """Set a device's desired or reported state; returns the keys written (maybe none)."""
        if self.get(device_id) is None:
            raise NotFound(f"no device {device_id!r} is registered")
        changes = self.twin.changes(side, device_id, document, replace)
        if not changes:
            return set()
        touched = self.twin.write(side, device_id, changes)
        self._changed(batch)
        return touched

    def ever_registered(self, device_id: str) -> bool:
        """Whether this registry holds any version of the device, live or deleted."""
        return self.versions.current(f"d/{device_id}") is not None

    def get(self, device_id: str) -> DeviceRecord | None:
        current = self.versions.current(f"d/{device_id}")
        if current is None or current.deleted:
            return None
        return self.quarantine.decode(
            lambda payload: DeviceRecord.from_payload(payload, current.stamp),
            current.payload, self.collection, f"d/{device_id}", current.stamp,
        )

    def records(self) -> list[DeviceRecord]:
        found = (self.get(key[2:]) for key in sorted(self.versions.keys()) if key.startswith("d/"))
        return [record for record in found if record is not None]

    def put(self, record: DeviceRecord, batch: WriteBatch, new_token: bool = False) -> tuple[DeviceRecord, str | None]:
        """Create or update a record; returns it and, when one was issued, the token."""
        check_device_id(record.device_id)
        for prefix in record.kv_read + record.kv_write:
            if not isinstance(prefix, str) or prefix.startswith("/"):
                raise InvalidArgument("KV allowances are key prefixes without a leading '/'")
        if len(record.policy_ids) > MAX_POLICY_LINKS or not all(
            isinstance(p, str) and _POLICY_ID.fullmatch(p) for p in record.policy_ids
        ):
            raise InvalidArgument(f"Policies are at most {MAX_POLICY_LINKS} ACL policy IDs (UUIDs)")
        existing = self.get(record.device_id)
        token = None
        if existing is None or new_token:
            token = secrets.token_urlsafe(32)
            record = replace(record, token_hash=hash_token(token))
        else:
            record = replace(record, token_hash=existing.token_hash)
        if not record.oscore_id and existing is not None:
            # An update keeps the device's OSCORE context unless it names a new one.
            record = replace(record, oscore_id=existing.oscore_id)
        created = existing.created_ms if existing else int(time.time() * 1000)
        record = replace(record, created_ms=created)
        self.versions.write(f"d/{record.device_id}", self.clock.now(), record.to_payload())
        self._changed(batch)
        return self.get(record.device_id), token

    def delete(self, device_id: str, batch: WriteBatch) -> set[str]:
        """Delete a record and its twin; returns the keys written."""
        if self.get(device_id) is None:
            raise NotFound(f"no device {device_id!r} is registered")
        self.versions.write(f"d/{device_id}", self.clock.now(), None)
        touched = {f"d/{device_id}"} | self.twin.clear(device_id)
        self._changed(batch)
        return touched

    def verify(self, device_id: str, token: str) -> DeviceRecord | None:
        """The record if ``token`` is this device's, else None (constant-time compare)."""
        record = self.get(device_id)
        if record is None or not record.token_hash or not token:
            return None
        if hmac.compare_digest(record.token_hash, hash_token(token)):
            return record
        return None


@dataclass
class Presence:
    online: bool = False
    last_seen: float | None = None  # wall-clock seconds
    protocol: str = ""
    address: str = ""


class PresenceTable:
    """Who is connected, over what, from where: in memory, reported to the hub as ephemeral state."""

    def __init__(self) -> None:
        self.devices: dict[str, Presence] = {}
        self.listeners: list[Callable[[str, Presence], None]] = []

    def seen(self, device_id: str, protocol: str, address: str = "", online: bool = True) -> None:
        presence = self.devices.setdefault(device_id, Presence())
        changed = presence.online != online or presence.protocol != protocol
        presence.online, presence.protocol = online, protocol
        presence.address = address or presence.address
        presence.last_seen = time.time()
        if changed:
            for listener in list(self.listeners):
                listener(device_id, presence)

    def offline(self, device_id: str) -> None:
        presence = self.devices.get(device_id)
        if presence is not None and presence.online:
            self.seen(device_id, presence.protocol, online=False)

    def get(self, device_id: str) -> Presence:
        return self.devices.get(device_id, Presence())

    def forget(self, device_id: str) -> None:
        """Drop a deleted device's entry, so the table does not keep every id it ever saw."""
        self.devices.pop(device_id, None)

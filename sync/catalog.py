"""The service catalog of one scope: durable service definitions as CRDT versions.

A service's definition (id, name, address, port, tags, meta and its check
definitions) is user-authored and replicated. Check *status* churns and is not
here (DESIGN.md, decision 5): the agent keeps it in memory and reports it.

Services are keyed ``<node>/<service id>``, because service ids are unique per
agent (Consul's rule) and a site may have more than one node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from .batch import WriteBatch
from .errors import InvalidArgument, NotFound
from .hlc import Stamp
from .records import RecordCollection

CHECK_KINDS = ("ttl", "http", "tcp", "static")
# A "static" check is run by nobody: its status is the one it was registered
# with (Consul's catalog checks, maintenance mode, the agent's own liveness).


@dataclass(frozen=True, slots=True)
class CheckDefinition:
    check_id: str
    name: str
    kind: str  # one of CHECK_KINDS
    target: str = ""  # URL for http, host:port for tcp
    interval_s: float = 10.0
    timeout_s: float = 10.0
    ttl_s: float = 0.0
    deregister_after_s: float | None = None
    notes: str = ""
    status: str = ""  # a static check's status; the initial one of the others ("" = critical)
    output: str = ""  # a static check's output

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.check_id,
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "interval": self.interval_s,
            "timeout": self.timeout_s,
            "ttl": self.ttl_s,
            "deregister_after": self.deregister_after_s,
            "notes": self.notes,
            "status": self.status,
            "output": self.output,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CheckDefinition:
        definition = cls(
            data["id"],
            data["name"],
            data["kind"],
            data["target"],
            data["interval"],
            data["timeout"],
            data["ttl"],
            data["deregister_after"],
            data.get("notes", ""),
            data.get("status", ""),
            data.get("output", ""),
        )
        strings = (definition.check_id, definition.name, definition.kind, definition.target, definition.notes,
                   definition.status, definition.output)
        if not all(type(s) is str for s in strings):
            raise ValueError("a check definition whose fields have the wrong types")
        return definition


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    node: str
    service_id: str
    name: str
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    checks: tuple[CheckDefinition, ...] = ()
    stamp: Stamp | None = None
    enable_tag_override: bool = False
    # Consul's service TaggedAddresses: name (lan, wan, lan_ipv4, ...) -> (address, port)
    tagged_addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    kind: str = ""  # Consul's Kind: "" for a typical service, or a proxy/gateway kind

    @property
    def catalog_key(self) -> str:
        return f"{self.node}/{self.service_id}"

    def to_payload(self) -> bytes:
        return cbor2.dumps(
            {
                "node": self.node,
                "id": self.service_id,
                "name": self.name,
                "address": self.address,
                "port": self.port,
                "tags": list(self.tags),
                "meta": dict(self.meta),
                "checks": [c.to_wire() for c in self.checks],
                "enable_tag_override": self.enable_tag_override,
                "tagged_addresses": {k: list(v) for k, v in self.tagged_addresses.items()},
                "kind": self.kind,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> ServiceEntry:
        data = cbor2.loads(payload)
        tagged = data.get("tagged_addresses", {})
        entry = cls(
            data["node"],
            data["id"],
            data["name"],
            data["address"],
            data["port"],
            tuple(data["tags"]),
            dict(data["meta"]),
            tuple(CheckDefinition.from_wire(c) for c in data["checks"]),
            stamp,
            data.get("enable_tag_override", False),
            {k: (v[0], v[1]) for k, v in tagged.items()},
            data.get("kind", ""),
        )
        strings = (entry.node, entry.service_id, entry.name, entry.address, *entry.tags, *entry.meta, *entry.meta.values(),
                   entry.kind, *entry.tagged_addresses, *(a for a, _ in entry.tagged_addresses.values()))
        if (
            not all(type(s) is str for s in strings)
            or type(entry.port) is not int
            or type(entry.enable_tag_override) is not bool
            or not all(type(p) is int for _, p in entry.tagged_addresses.values())
        ):
            raise ValueError("a service entry whose fields have the wrong types")
        return entry


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node of the catalog: Consul's node-level fields and node-level checks.

    Stored under the bare node name (a service's key always has a '/'). An
    agent writes its own node (``agent=True``); ``/v1/catalog/register`` writes
    external ones, whose check status is the one registered with them.
    """

    node: str
    address: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    checks: tuple[CheckDefinition, ...] = ()
    agent: bool = False
    stamp: Stamp | None = None

    def to_payload(self) -> bytes:
        return cbor2.dumps(
            {
                "record": "node",
                "node": self.node,
                "address": self.address,
                "meta": dict(self.meta),
                "tagged_addresses": dict(self.tagged_addresses),
                "checks": [c.to_wire() for c in self.checks],
                "agent": self.agent,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> NodeRecord:
        data = cbor2.loads(payload)
        record = cls(
            data["node"],
            data["address"],
            dict(data["meta"]),
            dict(data["tagged_addresses"]),
            tuple(CheckDefinition.from_wire(c) for c in data["checks"]),
            data["agent"],
            stamp,
        )
        strings = (record.node, record.address, *record.meta.items(), *record.tagged_addresses.items())
        flat = [s for item in strings for s in (item if isinstance(item, tuple) else (item,))]
        if not all(type(s) is str for s in flat) or type(record.agent) is not bool:
            raise ValueError("a node record whose fields have the wrong types")
        return record


class ServiceCatalog(RecordCollection):
    """Service definitions of one scope on one replica."""

    collection = "catalog"

    def register(self, service: ServiceEntry, batch: WriteBatch) -> ServiceEntry:
        self.validate(service)
        stamp = self.clock.now()
        self.versions.write(service.catalog_key, stamp, service.to_payload())
        self._changed(batch)
        return self.get(service.node, service.service_id)

    @staticmethod
    def validate(service: ServiceEntry) -> None:
        if not service.service_id or not service.name:
            raise InvalidArgument("a service needs a Name (and an ID, which defaults to it)")
        if "/" in service.node or "/" in service.service_id:
            raise InvalidArgument("node names and service ids must not contain '/'")
        if not 0 <= service.port <= 65535:
            raise InvalidArgument("Port is between 0 and 65535")

    def deregister(self, node: str, service_id: str, batch: WriteBatch) -> None:
        if self.get(node, service_id) is None:
            raise NotFound(f"no service {service_id!r} is registered on node {node!r}")
        self.versions.write(f"{node}/{service_id}", self.clock.now(), None)
        self._changed(batch)

    def get(self, node: str, service_id: str) -> ServiceEntry | None:
        return self._entry(f"{node}/{service_id}")

    def services(self) -> list[ServiceEntry]:
        found = (self._entry(key) for key in sorted(self.versions.keys()) if "/" in key)
        return [entry for entry in found if entry is not None]

    # -- nodes (keys without a '/') ------------------------------------------------

    def register_node(self, record: NodeRecord, batch: WriteBatch, service: ServiceEntry | None = None) -> NodeRecord:
        """Write a node record (and a service on it, validated first)."""
        if not record.node or "/" in record.node:
            raise InvalidArgument("a node needs a Node name without '/'")
        if service is not None:
            self.validate(service)  # before anything is written: all or nothing
        self.versions.write(record.node, self.clock.now(), record.to_payload())
        if service is not None:
            self.versions.write(service.catalog_key, self.clock.now(), service.to_payload())
        self._changed(batch)
        return self.node(record.node)

    def deregister_node(self, node: str, batch: WriteBatch) -> list[str]:
        """Remove a node and every service on it; returns the keys written."""
        keys = [e.catalog_key for e in self.services() if e.node == node]
        if self.node(node) is not None:
            keys.append(node)
        if not keys:
            raise NotFound(f"no node {node!r} is in the catalog")
        stamp = self.clock.now()
        for key in keys:
            self.versions.write(key, stamp, None)
        self._changed(batch)
        return keys

    def node(self, name: str) -> NodeRecord | None:
        if "/" in name:
            return None
        current = self.versions.current(name)
        if current is None or current.deleted:
            return None
        return self.quarantine.decode(
            lambda payload: NodeRecord.from_payload(payload, current.stamp), current.payload, self.collection, name,
            current.stamp,
        )

    def nodes(self) -> list[NodeRecord]:
        found = (self.node(key) for key in sorted(self.versions.keys()) if "/" not in key)
        return [record for record in found if record is not None]

    def _entry(self, key: str) -> ServiceEntry | None:
        if "/" not in key:
            return None  # a node record
        current = self.versions.current(key)
        if current is None or current.deleted:
            return None
        return self.quarantine.decode(
            lambda payload: ServiceEntry.from_payload(payload, current.stamp), current.payload, self.collection, key, current.stamp
        )

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

CHECK_KINDS = ("ttl", "http", "tcp")


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
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> CheckDefinition:
        return cls(
            data["id"],
            data["name"],
            data["kind"],
            data["target"],
            data["interval"],
            data["timeout"],
            data["ttl"],
            data["deregister_after"],
            data.get("notes", ""),
        )


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
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> ServiceEntry:
        data = cbor2.loads(payload)
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
        )
        strings = (entry.node, entry.service_id, entry.name, entry.address, *entry.tags, *entry.meta, *entry.meta.values())
        if not all(type(s) is str for s in strings) or type(entry.port) is not int:
            raise ValueError("a service entry whose fields have the wrong types")
        return entry


class ServiceCatalog(RecordCollection):
    """Service definitions of one scope on one replica."""

    collection = "catalog"

    def register(self, service: ServiceEntry, batch: WriteBatch) -> ServiceEntry:
        if not service.service_id or not service.name:
            raise InvalidArgument("a service needs a Name (and an ID, which defaults to it)")
        if "/" in service.node or "/" in service.service_id:
            raise InvalidArgument("node names and service ids must not contain '/'")
        if not 0 <= service.port <= 65535:
            raise InvalidArgument("Port is between 0 and 65535")
        stamp = self.clock.now()
        self.versions.write(service.catalog_key, stamp, service.to_payload())
        self._changed(batch)
        return self.get(service.node, service.service_id)

    def deregister(self, node: str, service_id: str, batch: WriteBatch) -> None:
        if self.get(node, service_id) is None:
            raise NotFound(f"no service {service_id!r} is registered on node {node!r}")
        self.versions.write(f"{node}/{service_id}", self.clock.now(), None)
        self._changed(batch)

    def get(self, node: str, service_id: str) -> ServiceEntry | None:
        return self._entry(f"{node}/{service_id}")

    def services(self) -> list[ServiceEntry]:
        found = (self._entry(key) for key in sorted(self.versions.keys()))
        return [entry for entry in found if entry is not None]

    def _entry(self, key: str) -> ServiceEntry | None:
        current = self.versions.current(key)
        if current is None or current.deleted:
            return None
        return self.quarantine.decode(
            lambda payload: ServiceEntry.from_payload(payload, current.stamp), current.payload, self.collection, key, current.stamp
        )

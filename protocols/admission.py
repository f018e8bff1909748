"""How many connections (or observers) each source, and everyone together, may hold.

Every listener that accepts from the network admits a new connection here
before it costs more than a socket, and releases it when the connection ends
(DESIGN.md, decision 8): one address must not be able to take all the file
descriptors, and all of them together must leave the agent room to work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class NetworkLimits:
    """The per-source and total bounds of every interface; each has a flag (docs/operations.md)."""

    http_connections: int = 1024
    http_connections_per_source: int = 256
    http_body_timeout_s: float = 30.0  # to receive a request's body once its head has arrived
    mqtt_connections: int = 10_000
    mqtt_connections_per_source: int = 2_000
    coap_observers: int = 10_000
    coap_observers_per_source: int = 256
    anonymous_devices: int = 10_000  # devices registered on anonymous first contact, at most
    anonymous_device_expiry_s: float = 7 * 24 * 3600  # forgotten after this long unseen
    sync_scopes_per_session: int = 16  # scopes one sync hello may name
    max_clock_skew_s: float = 300.0  # remote stamps further ahead are refused
    # CoAP state kept per peer (protocols/coap/limits.py): resource-directory
    # registrations, block-wise transfers being assembled or served, and the
    # duplicate-detection cache (RFC 7252 4.5), each per source and in total.
    coap_registrations: int = 2_048  # each holds up to 2 KiB of links (coap/rd.py), ~50 KiB in memory
    coap_registrations_per_source: int = 256
    coap_transfers: int = 1_024  # Block1 uploads being assembled plus Block2 answers held
    coap_transfers_per_source: int = 32
    coap_transfer_bytes: int = 64 * 1024 * 1024  # all those buffers together
    coap_duplicate_entries: int = 50_000  # remembered (address, message id) pairs
    coap_duplicate_entries_per_source: int = 5_000


class ConnectionLimit:
    """Counts what each source holds, and refuses past a per-source or total bound."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._held: dict[str, int] = {}
        self.count = 0
        self.refused = {"total": 0, "per_source": 0}

    def try_admit(self, source: str) -> str | None:
        """Take a place for ``source``; None if admitted, else the bound it hit."""
        if self.count >= self.total:
            self.refused["total"] += 1
            return "total"
        held = self._held.get(source, 0)
        if held >= self.per_source:
            self.refused["per_source"] += 1
            return "per_source"
        self._held[source] = held + 1
        self.count += 1
        return None

    def release(self, source: str) -> None:
        held = self._held.get(source, 0)
        if held <= 0:
            return
        self.count -= 1
        if held == 1:
            del self._held[source]
        else:
            self._held[source] = held - 1

    def held_by(self, source: str) -> int:
        return self._held.get(source, 0)

    @contextmanager
    def admitted(self, source: str) -> Iterator[str | None]:
        """``with limit.admitted(addr) as refused:`` -- refused is None when admitted."""
        refused = self.try_admit(source)
        try:
            yield refused
        finally:
            if refused is None:
                self.release(source)


def source_of(address: object) -> str:
    """The source a peer address counts against: its host (IPv4/IPv6), or the whole value."""
    if isinstance(address, (tuple, list)) and address:
        return str(address[0])
    return str(address)

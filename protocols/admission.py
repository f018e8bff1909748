"""How many connections (or observers) each source, and everyone together, may hold.

Every listener that accepts from the network admits a new connection here
before it costs more than a socket, and releases it when the connection ends
(DESIGN.md, decision 8): one address must not be able to take all the file
descriptors, and all of them together must leave the agent room to work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def _limit(default: float, flag: str, help: str, roles: tuple[str, ...] = ("edge",)) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help, "roles": roles})


@dataclass
class NetworkLimits:
    """The per-source and total bounds of every interface.

    Each field is a flag of ``konsul edge`` (and of ``konsul hub`` where its
    roles say so), made from the metadata here; docs/operations.md lists them.
    """

    http_connections: int = _limit(
        1024, "--http-max-connections", "HTTP connections held at once, all clients together", ("edge", "hub"))
    http_connections_per_source: int = _limit(
        256, "--http-max-connections-per-source", "HTTP connections one client address may hold", ("edge", "hub"))
    http_body_timeout_s: float = _limit(
        30.0, "--http-body-timeout", "seconds to receive a request's body once its head has arrived", ("edge", "hub"))
    mqtt_connections: int = _limit(10_000, "--mqtt-max-connections", "MQTT connections, all devices together")
    mqtt_connections_per_source: int = _limit(
        2_000, "--mqtt-max-connections-per-source", "MQTT connections one client address may hold")
    coap_observers: int = _limit(10_000, "--coap-max-observers", "CoAP observations, all clients together")
    coap_observers_per_source: int = _limit(
        256, "--coap-max-observers-per-source", "CoAP observations one client address may hold")
    anonymous_devices: int = _limit(
        10_000, "--anonymous-max-devices", "devices registered on anonymous first contact, at most")
    anonymous_device_expiry_s: float = _limit(
        7 * 24 * 3600.0, "--anonymous-device-expiry", "seconds after which an unseen anonymous device is forgotten")
    sync_scopes_per_session: int = _limit(
        16, "--sync-max-scopes", "scopes one sync connection may name", ("hub",))
    max_clock_skew_s: float = _limit(
        300.0, "--max-clock-skew", "seconds a peer's write stamps may run ahead of this clock", ("edge", "hub"))
    sync_scopes_total: int = _limit(
        1024, "--sync-max-sites", "scopes (sites) a hub creates, at most; existing ones always open", ("hub",))
    http_send_timeout_s: float = _limit(
        30.0, "--http-send-timeout", "seconds a response may go without progress before the client is dropped",
        ("edge", "hub"))
    http_body_bytes: int = _limit(
        64 * 2**20, "--http-max-body-bytes", "request-body bytes being received, all connections together",
        ("edge", "hub"))
    coap_registrations: int = _limit(2_048, "--coap-max-registrations", "resource-directory registrations in all")
    coap_registrations_per_source: int = _limit(
        256, "--coap-max-registrations-per-source", "resource-directory registrations of one client address")
    coap_transfers: int = _limit(1_024, "--coap-max-transfers", "block-wise transfers held at once, in all")
    coap_transfers_per_source: int = _limit(
        32, "--coap-max-transfers-per-source", "block-wise transfers one client address may hold")
    coap_transfer_bytes: int = _limit(
        64 * 2**20, "--coap-max-transfer-bytes", "bytes of all block-wise transfer buffers together")
    coap_duplicate_entries: int = _limit(
        50_000, "--coap-max-duplicate-entries", "remembered (address, message id) pairs for duplicate detection")
    coap_duplicate_entries_per_source: int = _limit(
        5_000, "--coap-max-duplicate-entries-per-source", "remembered message ids of one client address")

    # Rate limits (protocols/rate_limit.py; 0 turns one off). The defaults sit
    # above what one agent serves on a small machine (bench/http_kv.py: 5,000-
    # 10,000 requests/s from one address; bench/mqtt.py: ~8,000 messages/s from
    # one device), so they never slow a legitimate client by default; they cap a
    # single runaway or hostile principal. Operators lower them per deployment.
    http_rate_per_token: int = _limit(
        20_000, "--http-rate-per-token", "HTTP requests per second one ACL token may make (0: no limit)", ("edge", "hub"))
    http_burst_per_token: int = _limit(
        40_000, "--http-burst-per-token", "HTTP requests one ACL token may make at once, above its rate", ("edge", "hub"))
    http_rate_per_source: int = _limit(
        20_000, "--http-rate-per-source", "HTTP requests per second one client address may make (0: no limit)",
        ("edge", "hub"))
    http_burst_per_source: int = _limit(
        40_000, "--http-burst-per-source", "HTTP requests one client address may make at once, above its rate",
        ("edge", "hub"))
    device_message_rate: int = _limit(
        20_000, "--device-message-rate", "MQTT/CoAP messages per second one device may send (0: no limit)")
    device_message_burst: int = _limit(
        40_000, "--device-message-burst", "MQTT/CoAP messages one device may send at once, above its rate")
    # The DNS interface (--dns-addr, protocols/dns_server.py): a query over the rate is dropped unanswered.
    dns_rate_per_source: int = _limit(
        20_000, "--dns-rate-per-source", "DNS queries per second one client address may make (0: no limit)")
    dns_burst_per_source: int = _limit(
        40_000, "--dns-burst-per-source", "DNS queries one client address may make at once, above its rate")
    dns_connections: int = _limit(256, "--dns-max-connections", "DNS TCP connections, all clients together")
    dns_connections_per_source: int = _limit(
        32, "--dns-max-connections-per-source", "DNS TCP connections one client address may hold")
    # PUT /v1/snapshot streams its upload to the data directory (protocols/http/snapshot_routes.py),
    # bounded by this instead of the API's 1 MiB body bound.
    snapshot_max_bytes: int = _limit(
        2**30, "--snapshot-max-bytes", "bytes a snapshot uploaded for restore (PUT /v1/snapshot) may hold",
        ("edge", "hub"))


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

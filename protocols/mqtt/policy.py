"""What the MQTT gateway accepts, and how it reports what it refuses.

Every refusal (DESIGN.md, decision 8: "a dropped message with a logged reason
and a metric") goes through :meth:`Refusals.refuse`: it is counted in
``konsul_mqtt_refused_total{reason=...}`` and logged. A misbehaving device can
send thousands of bad messages a second, and an attacker can open thousands
of connections, so the log goes through the agent's per-peer limiter
(``sync/log_limits.py``), keyed by reason and by the admitted device and its
address, or before admission by the address alone (a client id or port is
the peer's to pick); the counter always counts every one.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from konsul.sync.errors import KonsulError
from konsul.sync.limits import decode_cbor_document, parse_json_document
from konsul.sync.log_limits import peer_log

log = logging.getLogger("konsul.mqtt")

# The label values of konsul_mqtt_refused_total; all exported from the start
# so that dashboards and alerts see zeros rather than missing series.
REASONS = (
    "malformed",  # a packet that breaks MQTT framing or encoding
    "protocol",  # not MQTT 3.1.1 or 5.0, or a well-formed packet where the protocol forbids it
    "too_large",  # a payload (or packet) over the limit
    "timeout",  # no CONNECT in time, or silence past 1.5x the keep-alive
    "auth",  # wrong or missing credentials, bad client id
    "will",  # a Last Will outside the device's own status topic
    "topic",  # a topic or filter outside the contract
    "forbidden",  # a contract topic this device may not use
    "payload",  # not a JSON object / CBOR map / online|offline where one is required
    "invalid",  # a KV write the state layer refuses (key rules, value size)
    "overload",  # the agent's queue of pending writes is full
    "connections",  # over the connection cap, per source address or in total: closed before reading
    "anonymous",  # a new anonymous device while the anonymous device cap is reached
    "limit",  # over a per-connection bound: filters, subscriptions, QoS 2 messages awaiting PUBREL
    "accept",  # accepting failed (out of file descriptors): the listener backed off
    "rate_limited",  # a device over its message rate (--device-message-rate): dropped
    "tls",  # a TLS handshake on the MQTT TLS listener that failed: plaintext, no or unknown certificate, too slow
)

# The MQTT 5 reason code a refused QoS 1/2 PUBLISH is acknowledged with (a
# 3.1.1 client gets a plain PUBACK: it has no way to hear why).
REFUSAL_CODES = {
    "topic": 0x90,  # topic name invalid: outside the contract
    "forbidden": 0x87,  # not authorized
    "payload": 0x99,  # payload format invalid
    "invalid": 0x99,  # a KV value the state layer refuses (size, ...)
    "overload": 0x97,  # quota exceeded
    "rate_limited": 0x96,  # message rate too high
}


class Metrics:
    """The gateway's Prometheus series, on the agent's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.refused = Counter(
            "konsul_mqtt_refused", "MQTT input refused, by reason", ["reason"], registry=registry
        )
        for reason in REASONS:
            self.refused.labels(reason)
        self.received = Counter(
            "konsul_mqtt_messages_received",
            "Device messages accepted, by kind (telemetry, reported, status, kv_write, kv_delete)",
            ["kind"],
            registry=registry,
        )
        self.published = Counter(
            "konsul_mqtt_messages_published",
            "Messages the agent published, by kind (kv, desired, status, event)",
            ["kind"],
            registry=registry,
        )
        self.connected = Gauge("konsul_mqtt_connected_devices", "Devices connected over MQTT now", registry=registry)
        self.connects = Counter("konsul_mqtt_connects", "MQTT connections accepted", registry=registry)


class Refusals:
    """Counts and logs refusals; rate-limits the log per reason and source, never the count."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def refuse(self, reason: str, who: str, detail: str, *, source: str | None = None) -> None:
        """Count and log one refusal.

        ``who`` is ``device@host:port`` (``?@host:port`` before admission), a
        device id or a broker; ``source`` keys the log limit instead of
        ``who`` without its port (give the address for a client not admitted).
        """
        self.metrics.refused.labels(reason).inc()
        key = ("mqtt", reason, source if source is not None else log_key(who))
        peer_log.log(log, logging.WARNING, key, "refused (%s) from %s: %s", reason, who, detail)

    def tls_failed(self, peer: str, source: str, detail: str) -> None:
        """A TLS handshake that failed (also counted by reason in the listener's ``ServerTls``)."""
        self.refuse("tls", f"?@{peer}", f"TLS handshake failed: {detail}", source=source)

    def count(self, reason: str) -> None:
        """Count a refusal the caller logs itself."""
        self.metrics.refused.labels(reason).inc()


def log_key(who: str) -> str:
    """``who`` without the port of ``client@host:port``, which a peer varies with every connection."""
    client, at, address = who.rpartition("@")
    if not at:
        return who
    host, colon, _port = address.rpartition(":")
    return f"{client}@{host if colon else address}"


class PayloadRefused(Exception):
    reason = "payload"


def decode_document(payload: bytes, *, cbor: bool) -> dict[str, Any]:
    """A JSON object, or with ``cbor`` also a CBOR map; else :class:`PayloadRefused`.

    The rules are the agent's one rule set for structured values from outside
    (``sync/limits.py``: depth, size, item count, finite numbers, string keys).
    A CBOR map starts with a byte 0xa0-0xbf, which no JSON text starts with,
    so the first byte tells the two apart without guessing.
    """
    try:
        if cbor and payload and 0xA0 <= payload[0] <= 0xBF:
            document = decode_cbor_document(payload, "the CBOR payload")
            kind = "CBOR item"
        else:
            document = parse_json_document(payload, "the JSON payload")
            kind = "JSON value"
    except KonsulError as error:
        raise PayloadRefused(str(error)[:160]) from None
    if not isinstance(document, dict):
        raise PayloadRefused(f"the {kind} is a {type(document).__name__}, not {'a map' if kind[0] == 'C' else 'an object'}")
    return document


def check_status(payload: bytes) -> bool:
    """True for ``online``, False for ``offline``; else :class:`PayloadRefused`."""
    if payload == b"online":
        return True
    if payload == b"offline":
        return False
    raise PayloadRefused(f"status is 'online' or 'offline', not {payload[:40]!r}")

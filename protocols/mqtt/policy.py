"""What the MQTT gateway accepts, and how it reports what it refuses.

Every refusal (DESIGN.md, decision 8: "a dropped message with a logged reason
and a metric") goes through :meth:`Refusals.refuse`: it is counted in
``konsul_mqtt_refused_total{reason=...}`` and logged. A misbehaving device can
send thousands of bad messages a second, so the log keeps one line per
(reason, client) per interval and says how many it left out; the counter
always counts every one.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import cbor2
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("konsul.mqtt")

# The label values of konsul_mqtt_refused_total; all exported from the start
# so that dashboards and alerts see zeros rather than missing series.
REASONS = (
    "malformed",  # a packet that breaks MQTT 3.1.1 framing or encoding
    "protocol",  # not MQTT 3.1.1
    "too_large",  # a payload (or packet) over the limit
    "timeout",  # no CONNECT in time, or silence past 1.5x the keep-alive
    "auth",  # wrong or missing credentials, bad client id
    "will",  # a Last Will outside the device's own status topic
    "topic",  # a topic or filter outside the contract
    "forbidden",  # a contract topic this device may not use
    "payload",  # not a JSON object / CBOR map / online|offline where one is required
    "invalid",  # a KV write the state layer refuses (key rules, value size)
    "overload",  # the agent's queue of pending writes is full
)
LOG_INTERVAL = 10.0


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
            "Messages the agent published, by kind (kv, desired, status)",
            ["kind"],
            registry=registry,
        )
        self.connected = Gauge("konsul_mqtt_connected_devices", "Devices connected over MQTT now", registry=registry)
        self.connects = Counter("konsul_mqtt_connects", "MQTT connections accepted", registry=registry)


class Refusals:
    """Counts and logs refusals; rate-limits the log, never the count."""

    def __init__(self, metrics: Metrics, clock=time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._windows: dict[tuple[str, str], list[float | int]] = {}

    def refuse(self, reason: str, who: str, detail: str) -> None:
        self.metrics.refused.labels(reason).inc()
        now = self.clock()
        window = self._windows.get((reason, who))
        if window is not None and now - window[0] < LOG_INTERVAL:
            window[1] += 1
            return
        left_out = int(window[1]) if window is not None else 0
        if len(self._windows) > 10_000:  # many distinct clients: forget, do not grow
            self._windows.clear()
        self._windows[(reason, who)] = [now, 0]
        more = f" ({left_out} more like it in the last {LOG_INTERVAL:.0f}s)" if left_out else ""
        log.warning("refused (%s) from %s: %s%s", reason, who, detail, more)


class PayloadRefused(Exception):
    reason = "payload"


def decode_document(payload: bytes, *, cbor: bool) -> dict[str, Any]:
    """A JSON object, or with ``cbor`` also a CBOR map; else :class:`PayloadRefused`.

    A CBOR map starts with a byte 0xa0-0xbf, which no JSON text starts with,
    so the first byte tells the two apart without guessing.
    """
    if cbor and payload and 0xA0 <= payload[0] <= 0xBF:
        try:
            document = cbor2.loads(payload)
        except Exception as error:  # cbor2 raises several types on bad input
            raise PayloadRefused(f"not a valid CBOR map: {error}") from None
        if not isinstance(document, dict):
            raise PayloadRefused("the CBOR item is not a map")
        return document
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as error:
        kinds = "a JSON object or a CBOR map" if cbor else "a JSON object"
        raise PayloadRefused(f"not {kinds}: {str(error)[:80]}") from None
    if not isinstance(document, dict):
        raise PayloadRefused(f"a JSON {type(document).__name__}, not an object")
    return document


def check_status(payload: bytes) -> bool:
    """True for ``online``, False for ``offline``; else :class:`PayloadRefused`."""
    if payload == b"online":
        return True
    if payload == b"offline":
        return False
    raise PayloadRefused(f"status is 'online' or 'offline', not {payload[:40]!r}")

"""What a simulated device is and does, whatever protocol carries it.

A :class:`SimDevice` holds the state a real device keeps across reconnects:
its identity and token, the sequence number of its next telemetry sample, the
desired state it last applied, and its reconnect backoff. The protocol
drivers (``mqtt_device``, ``coap_device``) move these over the wire; the
decisions are made here, once.

Sequence numbers must stay unique per device across a restart of the
simulator, which keeps no files: each run starts its devices at
``int(time.time() * 1_000_000)`` (microseconds since the epoch, the form of
the time-based numbers the edge itself gives, which the hub accepts up to
its clock plus the allowed skew) and counts up by one per sample. A later run
starts above anything an earlier run could have reached unless a device sent
more than one sample per microsecond. The numbers stay below 2**53, so they
survive JSON consumers that read numbers as doubles.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

MIN_INTERVAL = 0.01  # seconds; a desired interval below this is refused
MAX_INTERVAL = 86400.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
CONNECTING_CONCURRENCY = 32  # handshakes at once: a 1,000-device start is not a SYN flood


def seq_base(now: float | None = None) -> int:
    """The first sequence number of a run started at ``now`` (see module docstring)."""
    return int((time.time() if now is None else now) * 1_000_000)


@dataclass
class Counts:
    """What one protocol's devices have done; written by one thread only (see FleetCounters)."""

    connected: int = 0
    samples_sent: int = 0
    samples_acked: int = 0
    samples_resent: int = 0  # sent again after a reconnect, not acknowledged before
    samples_throttled: int = 0  # not taken: too many samples awaiting their acknowledgement
    desired_applied: int = 0
    reported_sent: int = 0
    connects: int = 0
    reconnects: int = 0
    random_disconnects: int = 0
    failures: int = 0  # connections lost or refused, requests that failed
    last_failure: str = ""

    def failed(self, device_id: str, what: str) -> None:
        self.failures += 1
        self.last_failure = f"{device_id}: {what}"


_TOTALLED = [name for name in Counts.__dataclass_fields__ if name != "last_failure"]


class FleetCounters:
    """What the whole fleet has done so far: per protocol, and totals as attributes.

    MQTT devices run on trio and CoAP devices on an asyncio thread, so each
    side counts into its own :class:`Counts` (``+=`` from two threads could
    lose increments); ``counters.samples_acked`` and the other totals add the
    two up when read.
    """

    def __init__(self) -> None:
        self.devices = 0
        self.mqtt = Counts()
        self.coap = Counts()

    def __getattr__(self, name: str) -> int:
        if name in _TOTALLED:
            return getattr(self.mqtt, name) + getattr(self.coap, name)
        raise AttributeError(name)

    @property
    def last_failure(self) -> str:
        return self.coap.last_failure or self.mqtt.last_failure

    def summary(self) -> str:
        """The one-line report the simulator prints periodically."""
        line = (
            f"sim: {self.connected}/{self.devices} connected (mqtt {self.mqtt.connected}, coap {self.coap.connected}), "
            f"samples {self.samples_sent} sent / {self.samples_acked} acked, "
            f"desired {self.desired_applied} applied, reconnects {self.reconnects} "
            f"({self.random_disconnects} random), failures {self.failures}"
        )
        if self.samples_throttled:
            line += f", throttled {self.samples_throttled}"
        if self.last_failure:
            line += f"; last failure: {self.last_failure}"
        return line


@dataclass
class SimDevice:
    """One simulated device's identity and the state it keeps across reconnects."""

    device_id: str
    protocol: str  # "mqtt" or "coap"
    token: str | None
    interval: float  # seconds between samples
    disconnect_rate: float  # mean random disconnects per minute; 0 never
    rng: random.Random
    seq: int = 0
    temp: float = 20.0
    applied: dict[str, Any] = field(default_factory=dict)
    unacked: dict[int, bytes] = field(default_factory=dict)  # seq -> encoded sample, until stored
    failures_in_row: int = 0

    def next_sample(self, now: float | None = None) -> dict[str, Any]:
        """The next telemetry sample: a slow random walk of a temperature."""
        self.seq += 1
        self.temp = round(min(90.0, max(-20.0, self.temp + self.rng.gauss(0.0, 0.2))), 2)
        return {"seq": self.seq, "ts": round(time.time() if now is None else now, 3), "temp": self.temp}

    def apply_desired(self, desired: Any) -> dict[str, Any] | None:
        """Apply a full desired state; the reported state to send, or None if nothing changed.

        A simulated device accepts every field (it has nothing to configure)
        and acts on ``interval``. An interval it cannot honour is not applied:
        the reported state keeps the interval in force, so the difference from
        desired stays visible.
        """
        if not isinstance(desired, dict):
            return None
        reported = dict(desired)
        interval = desired.get("interval")
        if interval is not None:
            valid = isinstance(interval, (int, float)) and not isinstance(interval, bool) and math.isfinite(interval)
            if valid and MIN_INTERVAL <= interval <= MAX_INTERVAL:
                self.interval = float(interval)
            reported["interval"] = self.interval
        if reported == self.applied:
            return None
        self.applied = reported
        return reported

    def follow_desired(self, desired: Any, counters: Counts) -> tuple[dict[str, Any] | None, bool]:
        """:meth:`apply_desired`, counted; also whether the sample interval changed."""
        before = self.interval
        reported = self.apply_desired(desired)
        if reported is not None:
            counters.desired_applied += 1
        return reported, self.interval != before

    def initial_report(self) -> dict[str, Any]:
        """What a device reports on connecting, before any desired state arrives."""
        return {**self.applied, "interval": self.interval, "protocol": self.protocol}

    def disconnect_after(self) -> float:
        """Seconds until the next random disconnect (inf: never); exponential arrivals."""
        if self.disconnect_rate <= 0:
            return math.inf
        return self.rng.expovariate(self.disconnect_rate / 60.0)

    def backoff(self) -> float:
        """Seconds to wait before reconnecting: doubling after each failure, with jitter."""
        ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.failures_in_row, 10))
        self.failures_in_row += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def connected(self) -> None:
        self.failures_in_row = 0

    @contextmanager
    def online(self, counts: Counts) -> Iterator[None]:
        """While a session is up: counted as connected, and the backoff starts over."""
        self.connected()
        counts.connects += 1
        counts.connected += 1
        try:
            yield
        finally:
            counts.connected -= 1

"""Prometheus figures of what the hub refused from sync peers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from .state import HubState


class HubRefusalCollector:
    """``konsul_sync_refused_total{reason}``, ``konsul_sync_events_dropped_total{reason}``,
    ``konsul_clock_skewed_stamps_total``,
    ``konsul_telemetry_refused_total``: read from the hub's state at scrape time."""

    def __init__(self, hub: HubState) -> None:
        self.hub = hub

    def collect(self):
        refused = CounterMetricFamily(
            "konsul_sync_refused", "Sync sessions the hub ended over what the peer sent, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self.hub.sync_refusals.by_code.items()):
            refused.add_metric([reason], count)
        yield refused
        dropped = CounterMetricFamily(
            "konsul_sync_events_dropped",
            "User events the hub dropped from a sync session it kept, by reason (global_read_only: a fleet-wide "
            "event from a site that may only read global)",
            labels=["reason"],
        )
        for reason, count in sorted(self.hub.sync_refusals.events_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "konsul_clock_skewed_stamps",
            "Stamps from elsewhere further ahead than the allowed clock skew (the clock did not follow them)",
            value=self.hub.replica.clock.skewed,
        )
        telemetry = self.hub.telemetry
        refused_samples = CounterMetricFamily(
            "konsul_telemetry_refused",
            "Forwarded telemetry samples refused: unreadable, of a device the site does not have, or numbered "
            "far ahead of the device's",
            labels=["reason"],
        )
        for reason, count in sorted(getattr(telemetry, "refused_by_reason", {}).items()):
            refused_samples.add_metric([reason], count)
        yield refused_samples

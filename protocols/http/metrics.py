"""Prometheus metrics of an agent, read from its state at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from konsul.sync.replica import Replica


class ReplicaCollector:
    """Exposes the replica's own counters without touching the write path."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def collect(self):
        keys = GaugeMetricFamily("konsul_kv_keys", "Live KV keys", labels=["scope"])
        index = GaugeMetricFamily("konsul_index", "Change index of the scope", labels=["scope"])
        conflicts = CounterMetricFamily(
            "konsul_kv_conflicts", "Concurrent writes that lost a conflict", labels=["scope"]
        )
        stored = GaugeMetricFamily(
            "konsul_crdt_stored_bytes", "CRDT snapshot plus log bytes", labels=["scope"]
        )
        compactions = CounterMetricFamily(
            "konsul_compactions", "Compactions into a new document epoch", labels=["scope"]
        )
        for name, scope in self.replica.scopes.items():
            keys.add_metric([name], len(scope.kv))
            index.add_metric([name], scope.index.value)
            conflicts.add_metric([name], scope.kv.conflicts)
            stored.add_metric([name], scope.stored_bytes())
            compactions.add_metric([name], scope.compactions)
        stores = self.replica.stores()
        yield from (keys, index, conflicts, stored, compactions)
        yield CounterMetricFamily(
            "konsul_store_commit_rounds", "Group-commit transactions", value=sum(s.rounds for s in stores)
        )
        yield CounterMetricFamily(
            "konsul_store_batches", "Writes committed through group commit", value=sum(s.batches for s in stores)
        )
        yield GaugeMetricFamily(
            "konsul_store_bytes", "Database and WAL size", value=sum(s.size_bytes() for s in stores)
        )


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "konsul_http_requests",
            "HTTP requests by method and status",
            ["method", "status"],
            registry=registry,
        )


class ConnectionCollector:
    """The HTTP listener's open connections and what its bounds refused or cut (server.py)."""

    def __init__(self, admission) -> None:
        self.admission = admission

    def collect(self):
        admission = self.admission
        yield GaugeMetricFamily("konsul_http_connections", "Open HTTP connections", value=admission.connections.count)
        refused = CounterMetricFamily(
            "konsul_http_connections_refused", "HTTP connections refused at a connection limit", labels=["limit"]
        )
        for limit, count in admission.connections.refused.items():
            refused.add_metric([limit], count)
        yield refused
        timeouts = CounterMetricFamily(
            "konsul_http_timeouts", "HTTP connections closed by a deadline (idle/head, body, send)", labels=["phase"]
        )
        for phase, count in admission.timeouts.items():
            timeouts.add_metric([phase], count)
        yield timeouts
        yield GaugeMetricFamily(
            "konsul_http_body_bytes", "Bytes of HTTP request bodies being received", value=admission.body_bytes
        )
        yield CounterMetricFamily(
            "konsul_http_bodies_refused", "HTTP requests refused because request bodies held too much memory",
            value=admission.bodies_refused,
        )
        yield CounterMetricFamily(
            "konsul_http_accept_errors", "accept() failures for want of file descriptors or memory",
            value=admission.accept_errors,
        )


class SyncCollector:
    """Sync figures per peer (the hub at an edge; each site at the hub)."""

    def __init__(self, sync_status) -> None:
        self.sync_status = sync_status

    def collect(self):
        labels = ["peer"]
        connected = GaugeMetricFamily("konsul_sync_connected", "1 while the peer is connected", labels=labels)
        pending = GaugeMetricFamily(
            "konsul_sync_pending_changes", "Changes the peer has not confirmed", labels=labels
        )
        sent = CounterMetricFamily("konsul_sync_sent_bytes", "Sync bytes sent", labels=labels)
        received = CounterMetricFamily("konsul_sync_received_bytes", "Sync bytes received", labels=labels)
        conflicts = CounterMetricFamily("konsul_sync_conflicts", "Conflicts in the synced scopes", labels=labels)
        for peer in self.sync_status().get("Peers", []):
            name = [str(peer["Peer"])]
            connected.add_metric(name, 1 if peer["Connected"] else 0)
            pending.add_metric(name, peer["PendingChanges"])
            sent.add_metric(name, peer["BytesSent"])
            received.add_metric(name, peer["BytesReceived"])
            conflicts.add_metric(name, peer["Conflicts"])
        yield from (connected, pending, sent, received, conflicts)
        yield from telemetry_metrics(self.sync_status().get("Telemetry") or {})


_TELEMETRY_FIGURES = {
    # status field: (metric, help, counter?)
    "Buffered": ("konsul_telemetry_buffered", "Samples in the edge's buffer, not yet at the hub", False),
    "BufferedBytes": ("konsul_telemetry_buffered_bytes", "Bytes the buffered samples take", False),
    "Dropped": ("konsul_telemetry_dropped", "Samples dropped because the buffer was full", True),
    "Forwarded": ("konsul_telemetry_forwarded", "Samples the hub confirmed as stored", True),
    "Ingested": ("konsul_telemetry_ingested", "Samples taken from devices since start", True),
    "Stored": ("konsul_telemetry_stored", "Samples stored at the hub", False),
    "Duplicates": ("konsul_telemetry_duplicates", "Samples received again and skipped", True),
}


def telemetry_metrics(status: dict):
    for name, (metric, help_text, counter) in _TELEMETRY_FIGURES.items():
        if name in status:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(metric, help_text, value=status[name])


def make_registry(replica: Replica, sync_status=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaCollector(replica))
    if sync_status is not None:
        registry.register(SyncCollector(sync_status))
    return registry

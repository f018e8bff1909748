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
        store = self.replica.store
        yield from (keys, index, conflicts, stored, compactions)
        yield CounterMetricFamily(
            "konsul_store_commit_rounds", "Group-commit transactions", value=store.rounds
        )
        yield CounterMetricFamily(
            "konsul_store_batches", "Writes committed through group commit", value=store.batches
        )
        yield GaugeMetricFamily("konsul_store_bytes", "Database and WAL size", value=store.size_bytes())


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "konsul_http_requests",
            "HTTP requests by method and status",
            ["method", "status"],
            registry=registry,
        )


def make_registry(replica: Replica) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaCollector(replica))
    return registry

"""Token buckets (protocols/rate_limit.py), on a stepped clock: no sleeps."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from konsul.protocols.admission import NetworkLimits
from konsul.protocols.rate_limit import (
    HttpRateLimits,
    RateLimited,
    TokenBuckets,
    device_message_limit,
    retry_after,
)


class SteppedClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refusal_then_recovery_at_the_rate():
    clock = SteppedClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock)
    assert [buckets.take("a") for _ in range(5)] == [None] * 5
    wait = buckets.take("a")
    assert wait == pytest.approx(0.1)  # one token at 10/s
    clock.now += 0.05
    assert buckets.take("a") == pytest.approx(0.05)  # a refusal spends nothing
    clock.now += 0.05
    assert buckets.take("a") is None
    clock.now += 60  # refills to the burst, not beyond
    assert [buckets.take("a") for _ in range(6)].count(None) == 5


def test_keys_are_independent_and_cost_counts():
    clock = SteppedClock()
    buckets = TokenBuckets(rate=1, burst=3, clock=clock)
    assert buckets.take("a", cost=3) is None
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") is None
    assert buckets.take("c", cost=100) is None  # charged as the burst: never refused forever
    assert buckets.take("c") == pytest.approx(1.0)


def test_a_clock_stepping_back_does_not_drain_or_fill():
    clock = SteppedClock()
    buckets = TokenBuckets(rate=1, burst=2, clock=clock)
    assert buckets.take("a") is None
    clock.now -= 500
    assert buckets.take("a") is None
    assert buckets.take("a") is not None


def test_rate_zero_turns_the_limit_off():
    buckets = TokenBuckets(rate=0, burst=0, clock=SteppedClock())
    assert not buckets.enabled
    assert all(buckets.take("a") is None for _ in range(100_000))
    assert len(buckets) == 0


def test_the_table_is_bounded_least_recently_used_first_out():
    clock = SteppedClock()
    buckets = TokenBuckets(rate=1, burst=1, max_keys=100, clock=clock)
    assert buckets.take("victim") is None
    assert buckets.take("victim") is not None
    for address in range(10_000):  # an attacker cycling addresses
        buckets.take(f"10.0.{address // 256}.{address % 256}")
        assert len(buckets) <= 100
    assert len(buckets) == 100
    # The victim was forgotten, which only ever gives it a full bucket again.
    assert buckets.take("victim") is None
    # A key in use stays: touch it while others churn.
    assert buckets.take("busy") is None
    for address in range(99):
        buckets.take(f"x{address}")
    assert buckets.take("busy") is not None  # still remembered, still empty


def test_refusals_are_counted_per_interface_and_kind_on_a_shared_registry():
    registry = CollectorRegistry()
    clock = SteppedClock()
    limits = NetworkLimits(http_rate_per_token=1, http_burst_per_token=2, http_rate_per_source=1, http_burst_per_source=4)
    http = HttpRateLimits.from_limits(limits, registry, clock=clock)
    mqtt = device_message_limit(NetworkLimits(device_message_rate=1, device_message_burst=1), "mqtt", registry, clock)

    assert http.check("acc-1", "10.0.0.1") is None
    assert http.check("acc-1", "10.0.0.2") is None
    refused = http.check("acc-1", "10.0.0.3")  # the token's burst is spent, from any address
    assert isinstance(refused, RateLimited) and refused.kind == "token" and refused.status == 429
    assert "this token" in str(refused) and "retry after 1 s" in str(refused)
    assert refused.headers == {"Retry-After": "1"} and refused.code == "rate_limited"
    for _ in range(4):
        http.check(None, "10.0.0.9")
    by_source = http.check(None, "10.0.0.9")
    assert by_source is not None and by_source.kind == "source"
    assert mqtt.take("pump-7") is None and mqtt.take("pump-7") is not None

    def count(interface: str, kind: str) -> float:
        return registry.get_sample_value("konsul_rate_limited_total", {"interface": interface, "kind": kind})

    assert count("http", "token") == 1 and count("http", "source") == 1 and count("mqtt", "device") == 1


def test_a_refused_address_spends_nothing_of_the_token():
    clock = SteppedClock()
    http = HttpRateLimits(TokenBuckets(1, 1, clock=clock), TokenBuckets(1, 1, clock=clock))
    assert http.check("acc", "a") is None
    assert http.check("acc2", "a").kind == "source"
    assert http.check("acc2", "b") is None  # acc2's bucket was not charged by the refusal


def test_retry_after_is_whole_seconds_rounded_up():
    assert retry_after(0.01) == 1 and retry_after(1.0) == 1 and retry_after(1.2) == 2


def test_default_limits_leave_room_for_the_benchmarks():
    limits = NetworkLimits()
    clock = SteppedClock()
    http = HttpRateLimits.from_limits(limits, clock=clock)
    # bench/http_kv.py: up to ~10,000 requests/s from one address and one token, for seconds.
    for second in range(3):
        for i in range(10_000):
            clock.now = 1000.0 + second + i / 10_000
            assert http.check("bench-token", "127.0.0.1") is None

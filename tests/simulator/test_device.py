"""A simulated device's decisions: samples, sequence numbers, desired state, backoff."""

from __future__ import annotations

import random

from konsul.hub.telemetry_store import TIME_SEQ_FLOOR
from konsul.simulator.device import BACKOFF_MAX, FleetCounters, SimDevice, seq_base


def make_device(**overrides) -> SimDevice:
    fields = dict(device_id="d-1", protocol="mqtt", token=None, interval=1.0, disconnect_rate=0.0, rng=random.Random(1))
    return SimDevice(**{**fields, **overrides})


def test_sequence_numbers_of_a_later_run_start_above_an_earlier_run():
    first = make_device(seq=seq_base(1_700_000_000.000))
    for _ in range(100_000):
        first.next_sample()
    later = make_device(seq=seq_base(1_700_000_000.100))  # 100 ms later
    assert later.next_sample()["seq"] > first.seq
    assert seq_base(4_102_444_800) < 2**53  # still exact as a double in the year 2100


def test_sequence_numbers_are_the_time_based_ones_the_hub_accepts():
    # The hub stores a time-based number (at least TIME_SEQ_FLOOR) only up to its
    # clock plus the allowed skew, in microseconds (hub/telemetry_store.py).
    now = 1_800_000_000.0
    assert TIME_SEQ_FLOOR <= seq_base(now) <= int(now * 1000) * 1000


def test_samples_count_up_and_carry_a_timestamp():
    device = make_device(seq=10)
    samples = [device.next_sample(now=5.0) for _ in range(3)]
    assert [s["seq"] for s in samples] == [11, 12, 13]
    assert all(s["ts"] == 5.0 and isinstance(s["temp"], float) for s in samples)


def test_desired_interval_is_applied_and_reported_once():
    device = make_device()
    assert device.apply_desired({"interval": 0.2, "mode": "eco"}) == {"interval": 0.2, "mode": "eco"}
    assert device.interval == 0.2
    assert device.apply_desired({"interval": 0.2, "mode": "eco"}) is None  # nothing changed
    assert device.apply_desired("not an object") is None


def test_an_interval_the_device_cannot_honour_is_reported_as_the_one_in_force():
    device = make_device(interval=2.0)
    assert device.apply_desired({"interval": 0}) == {"interval": 2.0}
    assert device.apply_desired({"interval": "fast", "x": 1}) == {"interval": 2.0, "x": 1}
    assert device.interval == 2.0


def test_backoff_doubles_to_a_ceiling_and_resets_on_connect():
    device = make_device()
    waits = [device.backoff() for _ in range(12)]
    assert waits[0] <= 0.5 and waits[3] > 1.0 and max(waits) <= BACKOFF_MAX
    device.connected()
    assert device.backoff() <= 0.5


def test_no_random_disconnects_at_rate_zero():
    assert make_device().disconnect_after() == float("inf")
    assert make_device(disconnect_rate=60.0).disconnect_after() < 60.0


def test_counters_total_both_protocols():
    counters = FleetCounters()
    counters.devices = 2
    counters.mqtt.connected, counters.coap.connected = 1, 1
    counters.mqtt.samples_acked, counters.coap.samples_acked = 3, 4
    assert counters.connected == 2 and counters.samples_acked == 7
    assert counters.summary().startswith("sim: 2/2 connected (mqtt 1, coap 1), samples 0 sent / 7 acked")

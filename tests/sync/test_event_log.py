"""sync/events.py: the bounded rings of user events, their wire form and Consul's index."""

from __future__ import annotations

import pytest

from konsul.sync.errors import InvalidArgument, ValueTooLarge
from konsul.sync.events import REPLAY_WINDOW_S, EventLog, UserEvent, matches_agent, uuid_index


def test_the_index_is_consuls_uuid_to_uint64():
    # agent/event_endpoint.go: the low 64 bits of the UUID's first half XOR its second half.
    assert uuid_index("b54fe110-7af5-cafc-d1fb-afc8ba432b1c") == 0xB54FE1107AF5CAFC ^ 0xD1FBAFC8BA432B1C


def test_a_ring_keeps_the_newest_events_and_merge_takes_each_id_once():
    log = EventLog("s1", keep=3)
    fired = [log.fire("s1", f"e{i}", None) for i in range(5)]
    assert [e.name for e in log.events("s1")] == ["e2", "e3", "e4"]
    other = EventLog("hub", keep=3)
    assert [e.name for e in other.merge("s1", log.replay("s1"))] == ["e2", "e3", "e4"]
    assert other.merge("s1", log.replay("s1")) == []  # replayed again: nothing new
    assert other.ltime == fired[-1].ltime  # the Lamport clock moved past what it received
    assert other.index("s1") == uuid_index(fired[-1].id) and other.index("global") == 1


def test_malformed_peer_events_are_dropped_and_counted():
    log = EventLog("hub")
    good = EventLog("s1").fire("s1", "ok", b"x").to_wire()
    bad = [
        "not a map", {**good, "id": "nope"}, {**good, "name": "_x"}, {**good, "payload": "str"},
        {**good, "lt": -1}, {**good, "nf": "(a"}, {**good, "payload": b"x" * 10_000}, {**good, "tf": "t", "sf": ""},
    ]
    assert [e.id for e in log.merge("s1", [*bad, good])] == [good["id"]]
    assert log.refused == len(bad)
    assert log.merge("s1", "not a list") == [] and log.refused == len(bad) + 1


def test_replay_leaves_out_events_older_than_the_window():
    now = [1_000_000_000]
    log = EventLog("s1", wall_ms=lambda: now[0])
    log.fire("s1", "old", None)
    now[0] += int(REPLAY_WINDOW_S * 1000) + 1
    log.fire("s1", "new", None)
    assert [item["name"] for item in log.replay("s1")] == ["new"]


def test_names_payloads_and_filters_are_checked_before_anything_is_kept():
    log = EventLog("s1")
    for name in ("", "_internal", "a/b", "x" * 200):
        with pytest.raises(InvalidArgument):
            log.fire("s1", name, None)
    with pytest.raises(ValueTooLarge):
        log.fire("s1", "big", b"x" * 5000)
    with pytest.raises(InvalidArgument):
        log.fire("s1", "e", None, service_filter="(")
    assert log.events("s1") == []


def test_filters_are_re2_consul_rules_and_linear_on_hostile_patterns():
    event = UserEvent("b54fe110-7af5-cafc-d1fb-afc8ba432b1c", "e", None, "^n", "web", "v1")
    assert matches_agent(event, "n1", [("web", ("v1",))])
    assert not matches_agent(event, "m1", [("web", ("v1",))])
    assert not matches_agent(event, "n1", [("web", ("v2",)), ("db", ("v1",))])
    # Catastrophic for a backtracking engine; RE2 answers at once.
    evil = UserEvent("b54fe110-7af5-cafc-d1fb-afc8ba432b1c", "e", None, "(a+)+$")
    assert not matches_agent(evil, "a" * 5000 + "!", [])

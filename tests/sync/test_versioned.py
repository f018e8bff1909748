"""The versioned map on bare pycrdt documents: the conflict rule without a store."""

from __future__ import annotations

import itertools

import pytest
from pycrdt import Doc

from konsul.sync.hlc import Stamp
from konsul.sync.versioned import VersionedMap


def new_map(client_id: int) -> tuple[VersionedMap, list[bytes]]:
    updates: list[bytes] = []
    return VersionedMap(Doc(client_id=client_id), updates.append), updates


def deliver(updates: list[bytes], target: VersionedMap):
    touched, removed = set(), []
    for update in updates:
        t, r = target.apply_update(update)
        touched |= t
        removed += r
    return touched, removed


EARLY = Stamp(1000, 0, "aaaa")
LATE = Stamp(2000, 0, "bbbb")


# pycrdt's own rule would pick the higher (or lower) client id; both ways round
# the later stamp must win.
@pytest.mark.parametrize("early_client,late_client", [(1, 2), (2, 1)])
def test_concurrent_writes_both_survive_and_the_later_stamp_is_current(early_client, late_client):
    early, early_log = new_map(early_client)
    late, late_log = new_map(late_client)
    early.write("k", EARLY, b"early")
    late.write("k", LATE, b"late")

    deliver(late_log, early)
    deliver(early_log, late)

    for side in (early, late):
        assert side.current("k").payload == b"late"
        assert [(v.stamp, v.payload) for v in side.versions("k")] == [
            (LATE, b"late"),
            (EARLY, b"early"),
        ]


def test_a_write_supersedes_only_the_versions_it_has_seen():
    a, a_log = new_map(1)
    b, b_log = new_map(2)
    a.write("k", Stamp(1, 0, "a"), b"one")
    deliver(a_log, b)
    a_log.clear()
    superseded = b.write("k", Stamp(2, 0, "b"), b"two")
    assert [v.payload for v in superseded] == [b"one"]

    touched, removed = deliver(b_log, a)
    assert touched == {"k"}
    assert [(v.stamp, v.payload) for v in removed] == [(Stamp(1, 0, "a"), b"one")]
    assert [v.payload for v in a.versions("k")] == [b"two"]


def test_a_tombstone_outranks_an_older_concurrent_write_in_any_delivery_order():
    writer, writer_log = new_map(1)
    deleter, deleter_log = new_map(2)
    writer.write("k", Stamp(1, 0, "w"), b"old")
    deleter.write("k", Stamp(2, 0, "d"), None)

    for order in itertools.permutations([writer_log, deleter_log]):
        third, _ = new_map(3)
        for log in order:
            deliver(log, third)
        current = third.current("k")
        assert current.deleted and current.stamp == Stamp(2, 0, "d")
        assert [v.payload for v in third.versions("k")] == [None, b"old"]


def test_reloading_a_document_gives_the_same_versions_and_size():
    source, _ = new_map(1)
    source.write_many([("a", Stamp(1, 0, "x"), b"1"), ("b", Stamp(1, 1, "x"), b"22")])
    source.write("a", Stamp(2, 0, "x"), None)
    copy = Doc()
    copy.apply_update(source.doc.get_update())
    reloaded = VersionedMap(copy, lambda update: None)
    assert sorted(reloaded.all_versions(), key=lambda v: v.key) == sorted(
        source.all_versions(), key=lambda v: v.key
    )
    assert reloaded.live_bytes == source.live_bytes


def test_restore_into_a_fresh_document_keeps_conflicts():
    a, a_log = new_map(1)
    b, _ = new_map(2)
    a.write("k", EARLY, b"early")
    b.write("k", LATE, b"late")
    deliver(a_log, b)
    fresh, _ = new_map(3)
    fresh.restore(b.all_versions())
    assert fresh.versions("k") == b.versions("k")
    assert fresh.live_bytes == b.live_bytes

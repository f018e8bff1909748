"""The versioned map on bare pycrdt documents: the conflict rule without a store."""

from __future__ import annotations

import itertools

import pytest
from pycrdt import Doc, Map

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


def test_a_rebuilt_document_keeps_conflicts():
    a, a_log = new_map(1)
    b, _ = new_map(2)
    a.write("k", EARLY, b"early")
    b.write("k", LATE, b"late")
    deliver(a_log, b)
    fresh = b.rebuilt()
    assert fresh.versions("k") == b.versions("k")
    assert fresh.live_bytes == b.live_bytes
    other, _ = new_map(3)
    other.apply_update(fresh.doc.get_update())
    assert other.versions("k") == b.versions("k")


def long_form_doc(versions: list[tuple[str, Stamp, bytes]]) -> bytes:
    """A document as written before compact stamps: ids with the long form."""
    doc = Doc(client_id=7)
    versions_map = doc.get("versions", type=Map)
    with doc.transaction():
        for key, stamp, payload in versions:
            versions_map[f"{key}\x00{stamp.encode()}"] = payload
    return doc.get_update()


OLD = Stamp(1_764_230_000_000, 0, "0123456789ab")
NEW = Stamp(1_764_230_000_500, 0, "ba9876543210")


def test_new_versions_get_compact_ids():
    versioned, _ = new_map(1)
    versioned.write("k", NEW, b"new")
    assert list(versioned._map.keys()) == [f"k\x00{NEW.compact()}"]
    assert len(NEW.compact()) == 16


@pytest.mark.parametrize("staged", [False, True])
def test_versions_with_long_form_ids_are_read_and_superseded(staged):
    doc = Doc(client_id=1)
    doc.apply_update(long_form_doc([("k", OLD, b"old"), ("j", OLD, b"other")]))
    versioned = VersionedMap(doc, lambda update: None)
    assert [(v.stamp, v.payload) for v in versioned.versions("k")] == [(OLD, b"old")]
    if staged:
        superseded = versioned.stage("k", NEW, b"new")
        versioned.flush()
    else:
        superseded = versioned.write("k", NEW, b"new")
    assert [v.stamp for v in superseded] == [OLD]
    # The old version is gone from the document itself, not only from the view.
    assert sorted(versioned._map.keys()) == sorted([f"j\x00{OLD.encode()}", f"k\x00{NEW.compact()}"])
    reloaded = VersionedMap(Doc(), lambda update: None)
    reloaded.apply_update(doc.get_update())
    assert [(v.stamp, v.payload) for v in reloaded.versions("k")] == [(NEW, b"new")]


def test_a_replica_with_long_form_ids_converges_with_one_writing_compact_ones():
    legacy = long_form_doc([("k", OLD, b"old")])
    first, first_log = new_map(1)
    second, second_log = new_map(2)
    first.apply_update(legacy)
    second.apply_update(legacy)
    first.write("k", NEW, b"new")
    deliver(first_log, second)
    assert [(v.stamp, v.payload) for v in second.versions("k")] == [(NEW, b"new")]
    assert list(second._map.keys()) == [f"k\x00{NEW.compact()}"]


def test_staged_writes_reach_the_document_in_one_update():
    versioned, updates = new_map(1)
    versioned.write("k", OLD, b"old")
    updates.clear()
    versioned.stage("k", NEW, b"new")
    versioned.stage("j", NEW, b"j")
    assert [v.payload for v in versioned.versions("k")] == [b"new"]  # visible at once
    assert updates == []
    versioned.flush()
    assert len(updates) == 1
    other, _ = new_map(2)
    other.apply_update(versioned.doc.get_update())
    assert sorted((v.key, v.payload) for v in other.all_versions()) == [("j", b"j"), ("k", b"new")]


def test_a_version_staged_and_superseded_before_the_flush_never_reaches_the_document():
    versioned, updates = new_map(1)
    versioned.stage("k", OLD, b"first")
    versioned.stage("k", NEW, b"second")
    versioned.flush()
    assert list(versioned._map.keys()) == [f"k\x00{NEW.compact()}"]

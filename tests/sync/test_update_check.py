"""What a sync frame and a Yjs update from a peer may carry (sync/wire.py, sync/update_check.py)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from konsul.sync.hlc import Stamp
from konsul.sync.telemetry import Sample, SequenceNumbers, check_sample, make_sample, sample_json
from konsul.sync.errors import KonsulError
from konsul.sync.update_check import UpdateRefused, check_update
from konsul.sync.wire import WireError, decode, encode, scan_cbor

NOW = Stamp(1_700_000_000_000, 0, "aaaaaaaaaaaa")


def update_of(entries: dict, root: str = "versions") -> bytes:
    doc = Doc()
    target = doc.get(root, type=Map)
    for name, value in entries.items():
        target[name] = value
    return doc.get_update()


def test_updates_our_replicas_write_pass():
    doc = Doc()
    versions = doc.get("versions", type=Map)
    versions[f"k\x00{NOW.compact()}"] = b"\x00value"
    versions[f"t\x00{NOW.encode()}"] = cbor2.dumps([b"v", 3, 1_700_000_001_000])
    versions[f"d\x00{NOW.compact()}"] = b""
    first = doc.get_update()
    state = doc.get_state()
    del versions[f"k\x00{NOW.compact()}"]
    versions[f"k\x00{NOW.compact()}"] = b"\x00again"  # the same id again: an item with an origin
    for update in (first, doc.get_update(state), doc.get_update()):
        check_update(update, "kv")
    check_update(update_of({f"d/x\x00{NOW.compact()}": cbor2.dumps({"a": [1, 2.5, None]})}), "devices")


@pytest.mark.parametrize(
    "update, collection",
    [
        (update_of({"no-stamp": b"\x00v"}), "kv"),
        (update_of({"k\x00not-a-stamp": b"\x00v"}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": "text"}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": 2**40}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": {"nested": 1}}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": b"\x83\xff"}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": cbor2.dumps(["v", 0, None])}), "kv"),
        (update_of({f"k\x00{NOW.compact()}": b"\x81" * 900 + b"\x00"}), "devices"),
        (update_of({f"k\x00{NOW.compact()}": b"\x00v"}, root="other"), "kv"),
        (b"\x01\x01\xff\xff\xff\xff\x0f\x00", "kv"),
        (b"", "kv"),
    ],
)
def test_updates_no_replica_writes_are_refused(update, collection):
    with pytest.raises(UpdateRefused):
        check_update(update, collection)


def test_text_and_nested_types_are_refused():
    doc = Doc()
    doc.get("versions", type=Map)["x"] = Text("hello")
    with pytest.raises(UpdateRefused):
        check_update(doc.get_update(), "kv")
    doc = Doc()
    doc.get("versions", type=Array).append(b"x")
    with pytest.raises(UpdateRefused):
        check_update(doc.get_update(), "kv")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_frame_or_a_wire_error(raw):
    try:
        decode(raw)
    except WireError:
        pass
    try:
        check_update(raw, "kv")
    except UpdateRefused:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
))
def test_the_scanner_ends_where_cbor2_does(value):
    raw = cbor2.dumps(value)
    assert scan_cbor(raw, 0, 64, 10_000) == len(raw)


@pytest.mark.parametrize("raw", [
    b"\x81" * 100_000 + b"\x00",          # nested past any stack
    b"\x9b" + b"\xff" * 8,                # an array announcing 2**64 items
    b"\xba\x00\x10\x00\x00" + b"\x00\xa0" * 0x100000,  # a million empty maps
    cbor2.dumps(cbor2.CBORTag(1, 10)),    # a tag
    encode({"t": "data", "n": 2**64, "s": "s", "c": "kv", "e": 1, "u": b""}),
    encode({"t": "hello", "v": 2, "site": "x" * 1000, "replica": "r", "role": "edge", "scopes": []}),
    cbor2.dumps({"t": "error", "code": "x", "detail": "y"}) + b"\x00",  # trailing bytes
])
def test_frames_past_the_bounds_are_wire_errors(raw):
    with pytest.raises(WireError):
        decode(raw)


def test_an_edge_buffers_only_samples_the_hub_stores():
    numbers = SequenceNumbers()
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    for document in (deep, {"v": float("nan")}, {"v": 2**70}, [1, 2]):
        with pytest.raises(KonsulError):
            make_sample("d1", document, numbers, 1_700_000_000_000)
    sample = make_sample("d1", {"t": 1.5}, numbers, 1_700_000_000_000)
    check_sample(sample)  # what the hub checks passes
    assert sample_json("s1", sample)["Data"] == {"t": 1.5}
    broken = Sample("d1", 1, 0, b"\xff\x00")
    with pytest.raises(KonsulError):
        check_sample(broken)
    shown = sample_json("s1", broken)
    assert shown["Data"] is None and shown["Undecodable"]

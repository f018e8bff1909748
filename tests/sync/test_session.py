"""The sync session as a state machine: bytes in, events and bytes out, no I/O."""

from __future__ import annotations

import cbor2
import pytest
from pycrdt import Doc, Map

from konsul.sync.session import (
    Covered,
    EphemeralReceived,
    LocalProtocolError,
    PeerClosed,
    PeerHello,
    RemoteProtocolError,
    State,
    StateVectorReceived,
    SyncSession,
    UpdateReceived,
)
from konsul.sync.wire import PROTOCOL_VERSION, decode_state_vector


def open_pair() -> tuple[SyncSession, SyncSession]:
    edge = SyncSession("edge", "s1", "e1", ["s1", "global"])
    hub = SyncSession("hub", "hub", "h1", [])
    [peer] = hub.receive(edge.start())
    assert peer == PeerHello("s1", "e1", "edge", ("s1", "global"), 0)
    [peer] = edge.receive(hub.start())
    assert peer.role == "hub"
    assert edge.state is State.OPEN and hub.state is State.OPEN
    return edge, hub


def doc_with(*keys: str) -> Doc:
    doc = Doc()
    versions = doc.get("versions", type=Map)
    for key in keys:
        versions[key] = b"v"
    return doc


def test_handshake_and_state_vector_exchange():
    edge, hub = open_pair()
    doc = doc_with("a")
    frame = edge.send_state_vector("s1", "kv", 1, doc.get_state())
    [event] = hub.receive(frame)
    assert event == StateVectorReceived("s1", "kv", 1, doc.get_state())
    assert edge.bytes_sent == hub.bytes_received > 0


def test_update_ack_reports_coverage_with_the_marker():
    edge, hub = open_pair()
    source = doc_with("a", "b")
    update = source.get_update()
    frame = edge.send_update("s1", "kv", 1, update, source.get_state(), marker="mark-1")
    [event] = hub.receive(frame)
    assert isinstance(event, UpdateReceived) and not event.snapshot
    replica = Doc()
    replica.apply_update(event.update)
    [covered] = edge.receive(hub.send_ack("s1", "kv", 1, event.seq, replica.get_state()))
    assert covered == Covered("s1", "kv", 1, event.seq, "mark-1")
    assert edge.pending_acks == 0


def test_ack_that_does_not_cover_claims_nothing():
    edge, hub = open_pair()
    source = doc_with("a")
    first_state = source.get_state()
    frame1 = edge.send_update("s1", "kv", 1, source.get_update(), first_state, marker=1)
    source.get("versions", type=Map)["b"] = b"v"
    frame2 = edge.send_update("s1", "kv", 1, source.get_update(), source.get_state(), marker=2)
    [event2] = hub.receive(frame2)
    # The peer acknowledges message 2 but holds only what message 1 carried.
    assert edge.receive(hub.send_ack("s1", "kv", 1, event2.seq, first_state)) == []
    assert edge.pending_acks == 1
    [event1] = hub.receive(frame1)
    [covered] = edge.receive(hub.send_ack("s1", "kv", 1, event1.seq, first_state))
    assert covered.marker == 1
    # Duplicate acks are harmless.
    assert edge.receive(hub.send_ack("s1", "kv", 1, event1.seq, first_state)) == []
    assert edge.receive(hub.send_ack("s1", "kv", 1, event2.seq, source.get_state())) == []


def test_later_covering_ack_settles_earlier_messages():
    edge, hub = open_pair()
    source = doc_with("a")
    edge.send_update("s1", "kv", 1, source.get_update(), source.get_state(), marker=1)
    source.get("versions", type=Map)["b"] = b"v"
    frame = edge.send_update("s1", "kv", 1, source.get_update(), source.get_state(), marker=2)
    [event] = hub.receive(frame)
    [covered] = edge.receive(hub.send_ack("s1", "kv", 1, event.seq, source.get_state()))
    assert covered.marker == 2
    assert edge.pending_acks == 0


def test_version_mismatch_is_an_error_on_both_sides():
    edge = SyncSession("edge", "s1", "e1", ["s1"])
    hub = SyncSession("hub", "hub", "h1", [])
    edge.start()
    future = cbor2.dumps({"t": "hello", "v": PROTOCOL_VERSION + 1, "site": "s1", "replica": "e1",
                          "role": "edge", "scopes": ["s1"], "now": 0})
    with pytest.raises(RemoteProtocolError) as caught:
        hub.receive(future)
    assert caught.value.code == "version_mismatch"
    assert hub.state is State.CLOSED
    [closed] = edge.receive(caught.value.reply)
    assert closed == PeerClosed("version_mismatch", caught.value.detail)
    assert "upgrade" in closed.detail
    assert edge.state is State.CLOSED


def test_role_mismatch():
    one, other = SyncSession("edge", "s1", "a", ["s1"]), SyncSession("edge", "s2", "b", ["s2"])
    one.start()
    with pytest.raises(RemoteProtocolError) as caught:
        one.receive(other.start())
    assert caught.value.code == "role_mismatch"
    hub = SyncSession("hub", "h", "a", [])
    hub.receive(SyncSession("edge", "s1", "e", ["s1"]).start())
    edge = SyncSession("edge", "s1", "e", ["s1"])
    edge.start()
    hello_from_edge_role = SyncSession("edge", "s9", "x", ["s9"]).start()
    with pytest.raises(RemoteProtocolError) as caught:
        edge.receive(hello_from_edge_role)
    assert caught.value.code == "role_mismatch"


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"\xff\x00garbage", "malformed"),
        (cbor2.dumps([1, 2]), "malformed"),
        (cbor2.dumps({"t": "nope"}), "malformed"),
        (cbor2.dumps({"t": "sv", "s": "s1", "c": "kv", "e": "1", "sv": b""}), "malformed"),
        (cbor2.dumps({"t": "data", "s": "s1", "c": "kv", "e": 1, "u": b""}), "malformed"),
        (cbor2.dumps({"t": "sv", "s": "other-site", "c": "kv", "e": 1, "sv": b"\x00"}), "unknown_scope"),
    ],
)
def test_malformed_frames_close_the_session(frame, code):
    edge, hub = open_pair()
    with pytest.raises(RemoteProtocolError) as caught:
        hub.receive(frame)
    assert caught.value.code == code
    assert hub.state is State.CLOSED
    [closed] = edge.receive(caught.value.reply)
    assert closed.code == code


def hub_refusal(hub: SyncSession, edge: SyncSession) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as caught:
        hub.receive(edge.start())
    assert hub.state is State.CLOSED
    return caught.value


def test_a_hub_session_bound_to_a_site_refuses_another_site():
    refused = hub_refusal(SyncSession("hub", "hub", "h1", [], bound_site="plant-1"),
                          SyncSession("edge", "plant-2", "e1", ["plant-2"]))
    assert refused.code == "site_not_allowed" and "plant-1" in refused.detail
    bound = SyncSession("hub", "hub", "h1", [], bound_site="plant-1")
    [peer] = bound.receive(SyncSession("edge", "plant-1", "e1", ["plant-1", "global"]).start())
    assert peer.scopes == ("plant-1", "global")


def test_an_edge_may_offer_only_its_own_scope_and_global():
    refused = hub_refusal(SyncSession("hub", "hub", "h1", []),
                          SyncSession("edge", "plant-1", "e1", ["plant-1", "plant-2", "global"]))
    assert refused.code == "scope_not_allowed" and "plant-2" in refused.detail


def test_a_peer_clock_far_ahead_is_refused_and_a_little_ahead_is_not():
    now = 1_800_000_000_000
    hub = SyncSession("hub", "hub", "h1", [], wall_ms=lambda: now, max_peer_ahead_ms=60_000)
    refused = hub_refusal(hub, SyncSession("edge", "s1", "e1", ["s1"], wall_ms=lambda: now + 3_600_000))
    assert refused.code == "clock_skew" and "NTP" in refused.detail
    hub = SyncSession("hub", "hub", "h1", [], wall_ms=lambda: now, max_peer_ahead_ms=60_000)
    [peer] = hub.receive(SyncSession("edge", "s1", "e1", ["s1"], wall_ms=lambda: now + 30_000).start())
    assert peer.now_ms == now + 30_000
    # A clock behind is not a threat to the stamps it writes (they lose), so it is let in.
    hub = SyncSession("hub", "hub", "h1", [], wall_ms=lambda: now, max_peer_ahead_ms=60_000)
    hub.receive(SyncSession("edge", "s1", "e1", ["s1"], wall_ms=lambda: now - 86_400_000).start())


def test_data_before_hello_is_refused():
    hub = SyncSession("hub", "hub", "h1", [])
    frame = cbor2.dumps({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\x00"})
    with pytest.raises(RemoteProtocolError) as caught:
        hub.receive(frame)
    assert caught.value.code == "unexpected"


def test_only_the_hub_sends_snapshots():
    edge, hub = open_pair()
    with pytest.raises(LocalProtocolError):
        edge.send_update("s1", "kv", 2, b"", Doc().get_state(), snapshot=True)
    frame = cbor2.dumps({"t": "snap", "n": 1, "s": "s1", "c": "kv", "e": 2, "u": b""})
    with pytest.raises(RemoteProtocolError):
        hub.receive(frame)
    edge, hub = open_pair()
    snap = hub.send_update("s1", "kv", 2, Doc().get_update(), Doc().get_state(), snapshot=True)
    [event] = edge.receive(snap)
    assert event.snapshot and event.epoch == 2


def test_sending_before_open_is_a_local_error():
    edge = SyncSession("edge", "s1", "e1", ["s1"])
    with pytest.raises(LocalProtocolError):
        edge.send_state_vector("s1", "kv", 1, b"\x00")


def test_ephemeral_messages():
    edge, hub = open_pair()
    [event] = hub.receive(edge.send_ephemeral("s1", "checks", {"service:web": "passing"}))
    assert event == EphemeralReceived("s1", "checks", {"service:web": "passing"})


def test_state_vector_decoding_matches_pycrdt():
    doc = doc_with("a", "b", "c")
    vector = decode_state_vector(doc.get_state())
    assert vector == {doc.client_id: 3}

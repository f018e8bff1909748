"""Sync frames and Yjs updates: what a peer (edge or hub) sends over the WebSocket.

- ``wire.decode``: any bytes give a message of the schema or ``WireError``;
- ``SyncSession.receive``: any frame, in any state, gives events or a
  ``RemoteProtocolError`` (the error frame to send back included);
- the apply path (``apply_remote`` of each collection, which
  ``Scope.apply_remote`` runs for every ``data`` frame): any bytes are refused
  with a clean error or merged, and what was merged can be read back by every
  reader and loads again after a restart.
"""

from __future__ import annotations

import cbor2
from fuzz_strategies import budget, cbor_values, inputs, sync_frames
from fuzz_seeds import SCOPES, versions_update
from fuzz_targets import TARGETS, open_sessions, sync_session_frames, sync_wire, yjs_update
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.sync import wire
from konsul.sync.hlc import Stamp
from konsul.sync.kv import encode_payload
from konsul.sync.versioned import version_id

WIRE_SEEDS = TARGETS["sync_wire"].seeds()
UPDATE_SEEDS = TARGETS["yjs_update"].seeds()


@budget(400)
@given(inputs(WIRE_SEEDS))
@example(b"\x81" * 100_000)  # nesting far past the decoder's recursion limit
@example(bytes.fromhex("5bffffffffffffffff"))  # a byte string claiming 2**64 bytes
def test_wire_decode_takes_any_bytes(data):
    sync_wire(data)




@budget(200)
@given(st.lists(sync_frames(), min_size=1, max_size=6))
def test_session_takes_any_frames(frames_in):
    sync_session_frames(frames_in, open_sessions())


@budget(100)
@given(st.lists(sync_frames(), max_size=4), st.lists(sync_frames(), max_size=4))
def test_session_after_a_good_hello_takes_any_frames(before, after):
    # The hub state after the edge's hello, before its answer, is reached only this way.
    sessions = open_sessions()
    hello = {"t": "hello", "v": wire.PROTOCOL_VERSION, "site": "s1", "replica": "e2", "role": "edge", "scopes": SCOPES, "now": 0}
    sessions[0].receive(wire.encode(hello))
    sync_session_frames(before + after, sessions)


# -- Yjs updates through the apply path ----------------------------------------------


@budget(150)
@given(inputs(UPDATE_SEEDS, max_size=128))
@example(bytes.fromhex("01010001000000"))
def test_random_updates_never_end_the_process(data):
    # Only process-ending errors count here; the strict property is the next test's.
    yjs_update(data, strict=False)


_STAMPS = st.builds(Stamp, st.integers(0, 2**48), st.integers(0, 300), st.sampled_from(["abcdefabcdef", "r1"]))
_KEYS = st.sampled_from(["k", "a/b", "d/dev-1", "n1/web", "desired/dev-1/mode", "reported/dev-1/t", "/abs", "a/../b", ""])
_PAYLOADS = st.one_of(
    st.builds(encode_payload, st.binary(max_size=8), st.integers(0, 2**64 - 1), st.none() | st.integers(0, 2**62)),
    st.builds(cbor2.dumps, cbor_values),
    st.binary(max_size=16),
    st.integers(-(2**40), 2**40),
    st.text(max_size=8),
)
_ENTRY_NAMES = st.one_of(st.builds(version_id, _KEYS, _STAMPS), st.text(max_size=12))


@budget(150)
@given(st.dictionaries(_ENTRY_NAMES, _PAYLOADS, min_size=1, max_size=3))
@example({version_id("k", Stamp(1_700_000_000_000, 0, "abcdefabcdef")): cbor2.dumps([1, 0, None])})
def test_valid_updates_with_hostile_content_are_refused_or_readable(entries):
    yjs_update(versions_update(entries))

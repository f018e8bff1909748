"""Sync frames into a hub's link over a real replica: the whole receive path.

``SyncLink.receive`` is what the hub's WebSocket endpoint and the edge's
connector call for every frame. Its documented outcome for a frame it cannot
use is :class:`LinkClosed` (after sending the peer an error frame); anything
else escapes to the endpoint as an unexplained failure of the connection.
Updates in ``data`` frames go through ``Scope.apply_remote`` into SQLite.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import cbor2
import pytest
import trio
from fuzz_strategies import budget, sync_frames
from fuzz_seeds import SCOPES, versions_update
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.sync import wire
from konsul.sync.hlc import Stamp
from konsul.sync.link import LinkClosed, SyncLink
from konsul.sync.replica import Replica
from konsul.sync.session import SyncSession
from konsul.sync.update_check import UpdateRefused
from konsul.sync.versioned import version_id

HELLO = wire.encode({"t": "hello", "v": wire.PROTOCOL_VERSION, "site": "s1", "replica": "e2", "role": "edge", "scopes": SCOPES, "now": 0})


@asynccontextmanager
async def running_replica(data_dir: str | Path) -> AsyncIterator[Replica]:
    """A replica with its store running and the test scopes open."""
    replica = Replica.open(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            for name in SCOPES:
                await replica.open_scope(name)
            yield replica
            nursery.cancel_scope.cancel()
    finally:
        replica.close()


def hub_link(replica: Replica, sent: list[bytes]) -> SyncLink:
    """The hub's side of a new session; what it sends the peer lands in ``sent``."""

    async def transmit(frame: bytes) -> None:
        sent.append(frame)

    return SyncLink(SyncSession("hub", "hub", replica.replica_id, []), replica.scope, transmit)


async def _receive_all(frames_in: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        async with running_replica(data_dir) as replica:
            link = hub_link(replica, [])
            try:
                for frame in [HELLO, *frames_in]:
                    await link.receive(frame)
            except LinkClosed:
                pass
            # The replica still takes and keeps a write.
            scope = replica.scope("s1")
            assert await scope.kv_put("fuzz/after", b"ok")
            assert scope.kv.get("fuzz/after").value == b"ok"


@budget(40)
@given(st.lists(sync_frames(), min_size=1, max_size=4))
@example([wire.encode({"t": "sv", "s": "s1", "c": "zz", "e": 1, "sv": b"\x00"})])
@example([  # a zero-length block: stored, then the diff for the next state vector panics
    wire.encode({"t": "data", "n": 1, "s": "s1", "c": "kv", "e": 1, "u": bytes.fromhex("01010001000000")}),
    wire.encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\x00"}),
])
async def test_hub_link_takes_any_frames(frames_in):
    await _receive_all(frames_in)


# -- the findings behind the property, as plain tests ------------------------------------

BLOCK_OF_LENGTH_ZERO = bytes.fromhex("01010001000000")  # yrs stores it, then panics on every diff
STAMP = Stamp(1_700_000_000_000, 0, "abcdefabcdef")
HOSTILE_UPDATES = [
    ("kv", BLOCK_OF_LENGTH_ZERO),
    ("kv", versions_update({version_id("k", STAMP): cbor2.dumps([1, 0, None])})),  # a KV value that is not bytes
    ("kv", versions_update({"no stamp": b"\x00v"})),
    ("catalog", versions_update({version_id("n1/web", STAMP): "not bytes"})),
    ("devices", versions_update({version_id("d/dev-1", STAMP): b"\x81" * 900 + b"\x00"})),
    ("zz", versions_update({version_id("k", STAMP): b"\x00v"})),
]


async def test_scope_apply_remote_refuses_hostile_updates_and_changes_nothing(tmp_path):
    async with running_replica(tmp_path) as replica:
        scope = replica.scope("s1")
        assert await scope.kv_put("k", b"acknowledged")
        before = {c: scope.doc(c).get_update() for c in ("kv", "catalog", "devices")}
        for collection, update in HOSTILE_UPDATES:
            with pytest.raises(UpdateRefused):
                await scope.apply_remote(collection, update)
        assert {c: scope.doc(c).get_update() for c in before} == before
        assert scope.kv.get("k").value == b"acknowledged"
    async with running_replica(tmp_path) as reopened:  # and nothing of them was stored
        scope = reopened.scope("s1")
        assert scope.kv.get("k").value == b"acknowledged"
        assert scope.doc("kv").get_update(b"\x00")  # the diff that used to panic


async def test_a_refused_update_ends_only_its_link_and_local_writes_go_on(tmp_path):
    async with running_replica(tmp_path) as replica:
        sent: list[bytes] = []
        state_vector = wire.encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\x00"})
        link = hub_link(replica, sent)
        await link.receive(HELLO)
        await link.receive(state_vector)  # the peer is at this epoch: local writes go to it
        with pytest.raises(LinkClosed) as closed:
            await link.receive(wire.encode({"t": "data", "n": 1, "s": "s1", "c": "kv", "e": 1, "u": BLOCK_OF_LENGTH_ZERO}))
        assert closed.value.code == "bad_update" and not closed.value.by_peer
        # The transport has not stopped the link yet (it flushes the error
        # frame first): a write meanwhile must not fail on the closed session.
        assert await replica.scope("s1").kv_put("after", b"ok")
        await link.flush()
        errors = [m for m in map(wire.decode, sent) if m["t"] == "error"]
        assert [m["code"] for m in errors] == ["bad_update"]
        link.stop()
        # The next session of the site gets its diff.
        sent.clear()
        again = hub_link(replica, sent)
        await again.receive(HELLO)
        await again.receive(state_vector)
        await again.flush()
        assert [m for m in map(wire.decode, sent) if m["t"] == "data"]
        again.stop()

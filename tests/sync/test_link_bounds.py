"""A sync link against a peer that asks for more than it reads (sync/link.py)."""

from __future__ import annotations

import pytest
import trio
from sync_support import running
from trio.testing import wait_all_tasks_blocked

from konsul.sync import link as link_module
from konsul.sync.link import LinkClosed, SyncLink
from konsul.sync.replica import Replica
from konsul.sync.session import SyncSession
from konsul.sync.wire import PROTOCOL_VERSION, encode


def edge_hello() -> bytes:
    return encode({"t": "hello", "v": PROTOCOL_VERSION, "site": "s1", "replica": "abcdefabcdef",
                   "role": "edge", "scopes": ["s1"], "now": 0})


async def test_a_peer_that_does_not_read_is_paused_then_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(link_module, "OUTBOX_PAUSE_BYTES", 4096)
    monkeypatch.setattr(link_module, "MAX_OUTBOX_BYTES", 64 * 1024)
    async with running(Replica.open(tmp_path)) as replica:
        scope = replica.scope("s1")
        await scope.kv_put("big", b"x" * 20_000)
        never = trio.Event()

        async def transmit(frame: bytes) -> None:
            await never.wait()  # the peer reads nothing

        link = SyncLink(SyncSession("hub", "hub", replica.replica_id, []), replica.scope, transmit)
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await link.receive(edge_hello())
            # Each empty state vector asks for the whole document again.
            asking = encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\x00"})
            await link.receive(asking)
            done = []

            async def reader() -> None:
                await link.drained()  # the transport waits here before reading more
                done.append(True)

            nursery.start_soon(reader)
            await wait_all_tasks_blocked()
            assert not done
            for _ in range(10):  # a transport that ignored drained() would queue these
                await link.receive(asking)
            assert link.overflowed and link.queued_frames == 0
            nursery.cancel_scope.cancel()
        # run() ends the session once it is free to notice.
        link2 = SyncLink(SyncSession("hub", "hub", replica.replica_id, []), replica.scope, transmit)
        link2.overflowed = True
        with pytest.raises(LinkClosed, match="too_slow"):
            await link2.run()

"""A hub and edges in one process, linked by a transport that can misbehave.

Frames a link transmits are not delivered by themselves: they wait in a
:class:`Wire` until the test delivers, drops, duplicates or reorders them. So a
test decides every fault, and what it checks does not depend on timing.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

from konsul.sync.link import LinkClosed, SyncLink
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.session import SyncSession


@dataclass
class Wire:
    """Frames in flight in one direction."""

    frames: list[bytes] = field(default_factory=list)

    async def transmit(self, frame: bytes) -> None:
        self.frames.append(frame)


class FleetClock:
    """The wall clock of every replica in a test, rising at every reading.

    Real clocks give writes made in one millisecond at different replicas the
    same wall time, and their order is then the replica ids' (random). With
    one clock that never repeats a reading, a write made after another always
    carries the later stamp, as on replicas a millisecond or more apart.
    """

    def __init__(self) -> None:
        self.last = 0

    def __call__(self) -> int:
        self.last = max(self.last + 1, int(time.time() * 1000))
        return self.last


FLEET_CLOCK = FleetClock()


class Node:
    """A replica that can be stopped and started again from its store."""

    def __init__(self, name: str, path: Path, role: str, site: str | None = None) -> None:
        self.name = name
        self.path = path
        self.role = role
        self.site = site
        self.replica: Replica | None = None
        self._cancel: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        if self.role == "hub":
            replica = Replica.open(self.path, per_scope_stores=True, wall_ms=FLEET_CLOCK)
        else:
            replica = Replica.open(self.path, auto_compact=False, epoch_authority=False, wall_ms=FLEET_CLOCK)
        self.replica = replica
        self._stopped = trio.Event()
        self._cancel = await nursery.start(self._run, replica)
        if self.role == "hub":
            await replica.open_scope(GLOBAL_SCOPE)
        else:
            replica.scope(self.site)
            replica.scope(GLOBAL_SCOPE)

    async def _run(self, replica: Replica, *, task_status) -> None:
        try:
            with trio.CancelScope() as cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(replica.run)
                    task_status.started(cancel)
                    await trio.sleep_forever()
        finally:
            replica.close()
            self._stopped.set()

    async def stop(self) -> None:
        self._cancel.cancel()
        await self._stopped.wait()
        self.replica = None


class Connection:
    """One edge-hub session pair over two wires."""

    def __init__(self, edge: Node, hub: Node, acked: dict) -> None:
        self.edge, self.hub = edge, hub
        self.up, self.down = Wire(), Wire()
        self.acked = acked
        self.closed = False
        self.edge_link = SyncLink(
            SyncSession("edge", edge.site, edge.replica.replica_id, [edge.site, GLOBAL_SCOPE]),
            edge.replica.scope,
            self.up.transmit,
            on_covered=self._edge_covered,
            rebase_after=lambda scope, collection: self.acked.get((edge.name, scope)),
        )
        self.hub_link = SyncLink(
            SyncSession("hub", "hub", hub.replica.replica_id, []),
            hub.replica.scope,
            self.down.transmit,
        )

    def _edge_covered(self, scope: str, collection: str, stamp) -> None:
        key = (self.edge.name, scope)
        if stamp is not None and (self.acked.get(key) is None or stamp > self.acked[key]):
            self.acked[key] = stamp

    async def open(self, nursery: trio.Nursery) -> None:
        await self.hub.replica.open_scope(self.edge.site)
        await nursery.start(self.edge_link.run)
        await nursery.start(self.hub_link.run)
        self.edge_link.start()

    def close(self) -> None:
        self.closed = True
        self.edge_link.stop()
        self.hub_link.stop()
        self.up.frames.clear()
        self.down.frames.clear()

    async def deliver(self, rng: random.Random | None = None, faults: bool = False) -> int:
        """Deliver what is in flight now (with faults when asked); returns frames delivered."""
        delivered = 0
        for wire, link in ((self.up, self.hub_link), (self.down, self.edge_link)):
            frames, wire.frames[:] = list(wire.frames), []
            if faults and rng is not None:
                frames, delayed = _misbehave(frames, rng)
                wire.frames.extend(delayed)  # delivered on a later round
            for frame in frames:
                if self.closed:
                    return delivered
                try:
                    await link.receive(frame)
                except LinkClosed:
                    self.close()
                    return delivered
                delivered += 1
            await trio.testing.wait_all_tasks_blocked()
        return delivered

    async def settle(self) -> None:
        """Deliver without faults until nothing is in flight."""
        for _ in range(200):
            await trio.testing.wait_all_tasks_blocked()
            if not self.up.frames and not self.down.frames:
                return
            await self.deliver()
        raise AssertionError("the links never went quiet")


def _misbehave(frames: list[bytes], rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """Drop, delay, duplicate and reorder; returns (deliver now, deliver later)."""
    now, later = [], []
    for frame in frames:
        roll = rng.random()
        if roll < 0.12:
            continue  # dropped
        if roll < 0.22:
            later.append(frame)  # delayed
            continue
        now.append(frame)
        if roll > 0.9:
            now.append(frame)  # duplicated
    if len(now) > 1 and rng.random() < 0.3:
        rng.shuffle(now)  # reordered
    return now, later

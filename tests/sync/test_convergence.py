"""The convergence promise: a hub and 3 edges, random writes, a hostile network.

Hypothesis draws a program of KV and catalog operations at any replica, in the
site and global scopes, interleaved with faults: dropped, delayed, duplicated
and reordered frames, partitions, restarts of any replica from its store, and
hub compactions into new epochs. After the network heals, every replica must
hold the same KV and catalog, and every acknowledged write must be there or
superseded by a write with a later stamp (so deletes never resurrect values).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sync_harness import Connection, Node

import konsul.sync.scope as scope_module
from konsul.sync.catalog import ServiceEntry
from konsul.sync.replica import GLOBAL_SCOPE

EDGES = 3
KEYS = ["a", "b", "c/d", "c/e"]
SERVICES = ["web", "db"]

replica_index = st.integers(0, EDGES)  # 0 is the hub
edge_index = st.integers(1, EDGES)
in_global = st.booleans()

steps = st.one_of(
    st.tuples(st.just("put"), replica_index, edge_index, in_global, st.sampled_from(KEYS), st.binary(max_size=8)),
    st.tuples(st.just("delete"), replica_index, edge_index, in_global, st.sampled_from(KEYS)),
    st.tuples(st.just("register"), replica_index, edge_index, in_global, st.sampled_from(SERVICES), st.integers(1, 9)),
    st.tuples(st.just("deregister"), replica_index, edge_index, in_global, st.sampled_from(SERVICES)),
    st.tuples(st.just("deliver"), edge_index, st.integers(0, 2**16)),
    st.tuples(st.just("partition"), edge_index),
    st.tuples(st.just("heal"), edge_index),
    st.tuples(st.just("restart"), replica_index),
    st.tuples(st.just("compact"), edge_index, in_global, st.sampled_from(["kv", "catalog"])),
)


class Fleet:
    def __init__(self, root: Path) -> None:
        self.hub = Node("hub", root / "hub", "hub")
        self.edges = [Node(f"e{i}", root / f"e{i}", "edge", f"s{i}") for i in range(1, EDGES + 1)]
        self.links: dict[int, Connection | None] = {i: None for i in range(1, EDGES + 1)}
        self.acked_stamps: dict = {}
        # (scope, collection, key, stamp) of every acknowledged write
        self.ledger: list[tuple[str, str, str, object]] = []

    def node(self, index: int) -> Node:
        return self.hub if index == 0 else self.edges[index - 1]

    async def start(self, nursery: trio.Nursery) -> None:
        await self.hub.start(nursery)
        for edge in self.edges:
            await edge.start(nursery)
            await self.hub.replica.open_scope(edge.site)
        for i in self.links:
            await self.connect(i, nursery)

    async def connect(self, i: int, nursery: trio.Nursery) -> None:
        if self.links[i] is None or self.links[i].closed:
            self.links[i] = Connection(self.edges[i - 1], self.hub, self.acked_stamps)
            await self.links[i].open(nursery)

    def disconnect(self, i: int) -> None:
        if self.links[i] is not None:
            self.links[i].close()
            self.links[i] = None

    async def run_step(self, step, nursery: trio.Nursery, rng: random.Random) -> None:
        kind = step[0]
        if kind in ("put", "delete", "register", "deregister"):
            await self.write(step)
        elif kind == "deliver":
            link = self.links[step[1]]
            if link is not None and not link.closed:
                await link.deliver(random.Random(step[2]), faults=True)
        elif kind == "partition":
            self.disconnect(step[1])
        elif kind == "heal":
            await self.connect(step[1], nursery)
        elif kind == "restart":
            node = self.node(step[1])
            for i in (self.links if step[1] == 0 else [step[1]]):
                self.disconnect(i)
            await node.stop()
            await node.start(nursery)
        elif kind == "compact":
            scope = GLOBAL_SCOPE if step[2] else f"s{step[1]}"
            await self.hub.replica.scope(scope).compact(step[3])

    async def write(self, step) -> None:
        kind, who, site_of, is_global = step[:4]
        node = self.node(who)
        scope_name = GLOBAL_SCOPE if is_global else (node.site if who else f"s{site_of}")
        scope = node.replica.scope(scope_name)
        if kind == "put":
            await scope.kv_put(step[4], step[5])
            self.ledger.append((scope_name, "kv", step[4], scope.kv.versions.current(step[4]).stamp))
        elif kind == "delete":
            if scope.kv.get(step[4]) is not None:
                await scope.kv_delete(step[4])
                self.ledger.append((scope_name, "kv", step[4], scope.kv.versions.current(step[4]).stamp))
        elif kind == "register":
            entry = ServiceEntry(node="n", service_id=step[4], name=step[4], port=step[5])
            await scope.register_service(entry)
            self.ledger.append((scope_name, "catalog", entry.catalog_key, scope.catalog.versions.current(entry.catalog_key).stamp))
        elif kind == "deregister":
            if scope.catalog.get("n", step[4]) is not None:
                await scope.deregister_service("n", step[4])
                self.ledger.append((scope_name, "catalog", f"n/{step[4]}", scope.catalog.versions.current(f"n/{step[4]}").stamp))

    async def heal(self, nursery: trio.Nursery) -> None:
        # Reconnect everything, as the edges' connectors do after a partition:
        # a session whose hello was lost never opened and must start again.
        for i in self.links:
            self.disconnect(i)
            await self.connect(i, nursery)
        for _ in range(3):
            await self.settle()
            for link in self.links.values():
                link.edge_link.resync()
                link.hub_link.resync()
        await self.settle()

    async def settle(self) -> None:
        """Deliver on every link, without faults, until each is quiet."""
        for link in self.links.values():
            await link.settle()

    def holders(self, scope: str) -> list[Node]:
        if scope == GLOBAL_SCOPE:
            return [self.hub, *self.edges]
        return [self.hub, next(e for e in self.edges if e.site == scope)]


def kv_view(node: Node, scope: str) -> dict:
    return {e.key: (e.value, e.flags) for e in node.replica.scope(scope).kv.list()}


def catalog_view(node: Node, scope: str) -> dict:
    return {(s.node, s.service_id): (s.name, s.port) for s in node.replica.scope(scope).catalog.services()}


async def run_program(program: list, root: Path, then=None) -> None:
    fleet = Fleet(root)
    rng = random.Random(0)
    async with trio.open_nursery() as nursery:
        await fleet.start(nursery)
        for step in program:
            await fleet.run_step(step, nursery, rng)
        await fleet.heal(nursery)
        check_converged(fleet)
        if then is not None:
            then(fleet)
        nursery.cancel_scope.cancel()


def check_converged(fleet: Fleet) -> None:
    scopes = [GLOBAL_SCOPE, *(e.site for e in fleet.edges)]
    for scope in scopes:
        holders = fleet.holders(scope)
        views = [(kv_view(n, scope), catalog_view(n, scope)) for n in holders]
        assert all(view == views[0] for view in views), f"{scope} diverged: {views}"
    for scope, collection, key, stamp in fleet.ledger:
        for node in fleet.holders(scope):
            target = node.replica.scope(scope)
            versions = target.kv.versions if collection == "kv" else target.catalog.versions
            current = versions.current(key)
            assert current is not None and current.stamp >= stamp, (
                f"acknowledged write {scope}/{collection}/{key}@{stamp} lost at {node.name}: {current}"
            )


@settings(
    max_examples=int(os.environ.get("KONSUL_CONVERGENCE_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(steps, min_size=5, max_size=40))
def test_replicas_converge_and_keep_acknowledged_writes(program):
    with tempfile.TemporaryDirectory() as root:
        trio.run(run_program, program, Path(root))


def test_concurrent_global_writes_resolve_to_the_later_stamp_everywhere(tmp_path):
    program = [
        ("partition", 1), ("partition", 2),
        ("put", 1, 1, True, "a", b"from-e1"),
        ("put", 2, 2, True, "a", b"from-e2"),
        ("put", 0, 1, True, "a", b"from-hub"),
    ]

    def check(fleet: Fleet) -> None:
        for node in [fleet.hub, *fleet.edges]:
            scope = node.replica.scope(GLOBAL_SCOPE)
            assert scope.kv.get("a").value == b"from-hub"
            history = scope.kv.history("a")
            losers = {h.value for h in history if h.conflict}
            # Every replica that saw the concurrent versions reports both losers.
            if node.name in ("hub", "e1", "e2"):
                assert losers == {b"from-e1", b"from-e2"}, (node.name, history)
                assert scope.kv.conflicts >= 2

    trio.run(run_program, program, tmp_path, check)


def test_edge_offline_across_an_epoch_change_keeps_its_writes(tmp_path):
    program = [
        ("put", 1, 1, True, "a", b"old"),
        ("deliver", 1, 0),
        ("partition", 1),
        ("put", 1, 1, True, "b", b"offline-global"),
        ("put", 1, 1, False, "c/d", b"offline-site"),
        ("put", 0, 1, True, "a", b"hub-new"),
        ("compact", 1, True, "kv"),
        ("compact", 1, False, "kv"),
        ("put", 0, 1, True, "a", b"hub-newer"),
        ("compact", 1, True, "kv"),
    ]

    def check(fleet: Fleet) -> None:
        hub = fleet.hub.replica
        assert hub.scope(GLOBAL_SCOPE).epoch("kv") == 3
        for node in (fleet.hub, fleet.edges[0]):
            assert node.replica.scope(GLOBAL_SCOPE).kv.get("b").value == b"offline-global"
            assert node.replica.scope(GLOBAL_SCOPE).kv.get("a").value == b"hub-newer"
            assert node.replica.scope("s1").kv.get("c/d").value == b"offline-site"
        assert fleet.edges[0].replica.scope(GLOBAL_SCOPE).epoch("kv") == 3

    trio.run(run_program, program, tmp_path, check)


async def catch_up_through_compactions(root: Path, seed: int, writes: int) -> None:
    """Two edges catch up on offline writes while the hub compacts again and again.

    Frames cross one at a time in a random order, the edges keep writing, and
    the hub starts a new epoch every few frames, so snapshots of one epoch meet
    data frames of the one before in both directions. Once the compactions
    stop, the links must go quiet soon, with every write everywhere and no
    resync needed. (Edges used to re-adopt every snapshot of an epoch and send
    each re-applied write in a frame of its own, each of which, arriving after
    the next compaction, brought another snapshot: the traffic grew without
    end. Then the re-applied writes were not sent at all until the next
    periodic resync.)
    """
    rng = random.Random(seed)
    hub = Node("hub", root / "hub", "hub")
    edges = [Node(f"e{i}", root / f"e{i}", "edge", f"s{i}") for i in (1, 2)]
    acked: dict = {}
    async with trio.open_nursery() as nursery:
        await hub.start(nursery)
        for edge in edges:
            await edge.start(nursery)
            await hub.replica.open_scope(edge.site)
        own_stamps: dict[tuple[str, int], object] = {}
        for edge in edges:  # offline: the same global keys at both edges, and site keys
            for j in range(writes):
                await edge.replica.scope(GLOBAL_SCOPE).kv_put(f"shared/{j}", f"{edge.name}-{j}".encode())
                await edge.replica.scope(edge.site).kv_put(f"local/{j}", f"{edge.name}-{j}".encode())
                own_stamps[edge.name, j] = edge.replica.scope(GLOBAL_SCOPE).kv.get(f"shared/{j}").stamp
        links = [Connection(edge, hub, acked) for edge in edges]
        for link in links:
            await link.open(nursery)
        hub_global = hub.replica.scope(GLOBAL_SCOPE)
        compacting_steps, budget = 300, 2_000
        live_keys: set[str] = set()
        for step in range(budget):
            await trio.testing.wait_all_tasks_blocked()
            in_flight = [(wire, receiver) for link in links
                         for wire, receiver in ((link.up, link.hub_link), (link.down, link.edge_link)) if wire.frames]
            if not in_flight and step >= compacting_steps:
                break
            roll = rng.random()
            if step < compacting_steps and roll < 0.2:
                edge = rng.choice(edges)
                await edge.replica.scope(GLOBAL_SCOPE).kv_put(f"live/{step}", b"x" * 50)
                live_keys.add(f"live/{step}")
            elif step < compacting_steps and roll < 0.25:
                await hub_global.compact("kv")
            elif in_flight:
                wire, receiver = rng.choice(in_flight)
                await receiver.receive(wire.frames.pop(0))
        else:
            pending = sum(len(link.up.frames) + len(link.down.frames) for link in links)
            raise AssertionError(f"{pending} frames still in flight after {budget} steps")
        assert hub_global.compactions >= 5
        views = [{e.key: e.value for e in node.replica.scope(GLOBAL_SCOPE).kv.list()} for node in (hub, *edges)]
        assert views[0] == views[1] == views[2]
        for edge in edges:
            site = {e.key: e.value for e in hub.replica.scope(edge.site).kv.list()}
            assert site == {f"local/{j}": f"{edge.name}-{j}".encode() for j in range(writes)}
            assert site == {e.key: e.value for e in edge.replica.scope(edge.site).kv.list()}
        for j in range(writes):  # the later write wins
            winner = max((edge.name for edge in edges), key=lambda name: own_stamps[name, j])
            assert views[0][f"shared/{j}"] == f"{winner}-{j}".encode()
        assert set(views[0]) == {f"shared/{j}" for j in range(writes)} | live_keys
        nursery.cancel_scope.cancel()


def test_edges_catch_up_while_the_hub_compacts_again_and_again(tmp_path):
    for seed in range(3):
        trio.run(catch_up_through_compactions, tmp_path / str(seed), seed, 100)


def test_concurrent_writes_across_an_epoch_change_keep_the_loser_everywhere(tmp_path):
    """Edge 2 writes offline while edge 1's concurrent writes reach the hub and the hub compacts.

    Edge 2 then adopts the new epoch and writes its versions again: each must
    supersede only what edge 2 had seen (the seed value), so edge 1's concurrent
    version stays, as the loser ("a": edge 2 wrote first) or as the winner
    ("b": edge 2 wrote last), at every replica.
    """

    async def scenario() -> None:
        fleet = Fleet(tmp_path)
        async with trio.open_nursery() as nursery:
            await fleet.start(nursery)
            hub = fleet.hub.replica.scope(GLOBAL_SCOPE)
            e1, e2 = (edge.replica.scope(GLOBAL_SCOPE) for edge in fleet.edges[:2])
            for key in ("a", "b"):
                await hub.kv_put(key, b"seed")
            await fleet.settle()
            assert e2.kv.get("a").value == b"seed"
            fleet.disconnect(2)
            await e2.kv_put("a", b"from-e2")
            await e1.kv_put("a", b"from-e1")
            await e1.kv_put("b", b"from-e1")
            await e2.kv_put("b", b"from-e2")
            await fleet.links[1].settle()
            await hub.compact("kv")
            await fleet.links[1].settle()
            await fleet.connect(2, nursery)
            for _ in range(2):
                await fleet.settle()
            assert hub.epoch("kv") == e2.epoch("kv") == 2
            for node in (fleet.hub, *fleet.edges):
                scope = node.replica.scope(GLOBAL_SCOPE)
                for key, winner, loser in (("a", b"from-e1", b"from-e2"), ("b", b"from-e2", b"from-e1")):
                    assert scope.kv.get(key).value == winner, (node.name, key)
                    history = scope.kv.history(key)
                    assert {h.value for h in history if h.conflict} == {loser}, (node.name, key, history)
                assert scope.kv.conflicts == 2, node.name
            nursery.cancel_scope.cancel()

    trio.run(scenario)


async def fleet_whose_hub_compacts_on_any_overwrite(root: Path, nursery: trio.Nursery, monkeypatch):
    """Hub and edges holding key "a"; from then on any overwrite makes a hub compaction due."""
    fleet = Fleet(root)
    await fleet.start(nursery)
    hub = fleet.hub.replica.scope(GLOBAL_SCOPE)
    await hub.kv_put("a", b"seed" * 100)
    await fleet.settle()
    monkeypatch.setattr(scope_module, "MIN_COMPACTION_BYTES", 0)
    monkeypatch.setattr(scope_module, "COMPACTION_FACTOR", 1.0)
    return fleet, hub, fleet.edges[0].replica.scope(GLOBAL_SCOPE)


def test_hub_compacting_while_it_applies_an_edge_update_keeps_the_link_live(tmp_path, monkeypatch):
    """The hub compacts inside the apply of an edge's frame (its log outgrew the live data).

    The edge gets the new epoch's snapshot; the ack for its frame must still
    confirm its write, and the hub must keep streaming to it in the new epoch
    (it went back to thinking the edge was in the old one, and sent nothing
    until the next periodic resync).
    """
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            fleet, hub, e1 = await fleet_whose_hub_compacts_on_any_overwrite(tmp_path, nursery, monkeypatch)
            monkeypatch.setattr(scope_module, "COMPACTION_QUIET_S", 0)  # compact inside the apply
            await e1.kv_put("a", b"from-e1" * 100)
            written = e1.kv.get("a").stamp
            await fleet.links[1].settle()
            assert hub.epoch("kv") == 2 and e1.epoch("kv") == 2
            assert fleet.acked_stamps[("e1", GLOBAL_SCOPE)] >= written
            monkeypatch.setattr(scope_module, "MIN_COMPACTION_BYTES", 1 << 30)
            await hub.kv_put("b", b"from-hub")
            await fleet.links[1].settle()
            assert e1.kv.get("b").value == b"from-hub"
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def test_hub_waits_for_a_pause_in_incoming_updates_before_it_compacts(tmp_path, monkeypatch):
    """A compaction due while an edge streams updates in waits until they pause.

    (Compacting mid-stream sends every edge a snapshot and makes edges still
    sending in the old epoch adopt it and send their writes again.)
    """
    clock = trio.testing.MockClock()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            fleet, hub, e1 = await fleet_whose_hub_compacts_on_any_overwrite(tmp_path, nursery, monkeypatch)
            durable: dict[int, trio.Event] = {2: trio.Event(), 3: trio.Event()}
            hub.epoch_listeners.append(lambda collection: durable[hub.epoch(collection)].set())
            for epoch, value in ((2, b"from-e1" * 100), (3, b"again-from-e1" * 100)):  # and every time after
                await e1.kv_put("a", value)
                await fleet.links[1].settle()
                assert hub.needs_compaction("kv") and hub.epoch("kv") == epoch - 1
                clock.jump(scope_module.COMPACTION_QUIET_S / 2)
                await trio.testing.wait_all_tasks_blocked()
                assert hub.epoch("kv") == epoch - 1
                clock.jump(scope_module.COMPACTION_QUIET_S / 2)
                await trio.testing.wait_all_tasks_blocked()
                assert hub.epoch("kv") == epoch  # begun (in memory)
                await durable[epoch].wait()  # durable, with the snapshots queued for the edges
                await fleet.settle()
                assert e1.epoch("kv") == epoch and e1.kv.get("a").value == value
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=clock)


def test_hub_sends_an_update_it_answered_with_before_it_was_durable_only_once(tmp_path, monkeypatch):
    """The hub answers a state vector from memory, which may hold an update still being committed.

    Once durable, that update is forwarded to the other edges; the edge that
    got it in the answer must not receive it a second time.
    """

    async def scenario() -> None:
        fleet = Fleet(tmp_path)
        async with trio.open_nursery() as nursery:
            await fleet.start(nursery)
            await fleet.settle()
            hub_store = fleet.hub.replica.scope(GLOBAL_SCOPE).store
            committing, release = trio.Event(), trio.Event()
            commit = hub_store.commit

            async def slow_commit(batch):
                committing.set()
                await release.wait()
                return await commit(batch)

            monkeypatch.setattr(hub_store, "commit", slow_commit)
            value = bytes(range(256)) * 32  # 8 KiB: its frame is easy to tell from the rest
            await fleet.edges[1].replica.scope(GLOBAL_SCOPE).kv_put("big", value)
            e1_link, e2_link = fleet.links[1], fleet.links[2]
            to_e1: list[int] = []  # sizes of the frames the hub sends e1
            transmit = e1_link.hub_link._transmit

            async def recording(frame: bytes) -> None:
                to_e1.append(len(frame))
                await transmit(frame)

            monkeypatch.setattr(e1_link.hub_link, "_transmit", recording)
            await trio.testing.wait_all_tasks_blocked()

            taken = trio.Event()

            async def hub_takes_e2_frames() -> None:
                frames, e2_link.up.frames[:] = list(e2_link.up.frames), []
                for frame in frames:
                    await e2_link.hub_link.receive(frame)
                taken.set()

            nursery.start_soon(hub_takes_e2_frames)
            await committing.wait()  # applied in the hub's memory, not durable yet
            e1_link.edge_link.resync()
            await trio.testing.wait_all_tasks_blocked()
            await e1_link.deliver()  # e1's state vector up, the hub's answer (with "big") down
            assert fleet.edges[0].replica.scope(GLOBAL_SCOPE).kv.get("big").value == value
            release.set()
            await taken.wait()  # durable at the hub, and forwarded
            for _ in range(2):
                await fleet.settle()
            assert fleet.edges[2].replica.scope(GLOBAL_SCOPE).kv.get("big").value == value
            assert len([size for size in to_e1 if size > len(value)]) == 1, to_e1
            nursery.cancel_scope.cancel()

    trio.run(scenario)

"""Consul KV semantics and the conflict rules, on real replicas that exchange updates."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cbor2
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from sync_support import BASE_MS, WallClock, send, serve, sync_all, view

from konsul.sync.errors import CasMissingKey
from konsul.sync.hlc import Stamp
from konsul.sync.kv import decode_payload, encode_payload
from konsul.sync.replica import Replica

EARLY_MS = BASE_MS + 1_000
LATE_MS = BASE_MS + 2_000


@pytest.fixture
async def trio_of_replicas(open_replica):
    """Three partitioned replicas of scope ``site``: A's clock is behind B's."""
    walls = {"a": WallClock(EARLY_MS), "b": WallClock(LATE_MS), "c": WallClock(BASE_MS)}
    scopes = {}
    for name, wall in walls.items():
        replica = await open_replica(name, wall_ms=wall)
        scopes[name] = replica.scope("site")
    return scopes


async def deliver(scopes, route: str) -> None:
    """Deliver along a route such as ``"a>c b>c c>a"``, in that order."""
    for hop in route.split():
        src, dst = hop.split(">")
        await send(scopes[src], scopes[dst])


def records(scope, key, stamp):
    return [h for h in scope.kv.history(key) if h.stamp == stamp]


# -- conflicts -----------------------------------------------------------------

ROUTES = [
    "a>b b>a b>c",  # the two writers meet, then C learns from one of them
    "a>c b>c c>a c>b",  # C relays, the early write reaches it first
    "b>c a>c c>a c>b",  # C relays, the late write reaches it first
    "b>a a>c a>b",  # A learns first and relays both
]


@pytest.mark.parametrize("late_writes_first", [False, True])
@pytest.mark.parametrize("route", ROUTES)
async def test_concurrent_writes_converge_to_the_later_stamp_and_keep_the_loser(
    trio_of_replicas, route, late_writes_first
):
    s = trio_of_replicas
    writes = [("a", b"early", 1), ("b", b"late", 2)]
    for name, value, flags in reversed(writes) if late_writes_first else writes:
        assert await s[name].kv_put("cfg/mode", value, flags=flags)
    early_stamp = s["a"].kv.get("cfg/mode").stamp
    late_stamp = s["b"].kv.get("cfg/mode").stamp

    await deliver(s, route)

    for name, scope in s.items():
        entry = scope.kv.get("cfg/mode")
        assert (entry.value, entry.flags, entry.stamp) == (b"late", 2, late_stamp), name
        assert scope.kv.conflicts == 1, name
        history = scope.kv.history("cfg/mode")
        assert history[0].stamp == late_stamp and not history[0].conflict
        [loser] = records(scope, "cfg/mode", early_stamp)
        assert (loser.op, loser.conflict, loser.value, loser.flags) == ("set", True, b"early", 1)


async def test_three_concurrent_writes_leave_two_losers_everywhere(trio_of_replicas):
    s = trio_of_replicas
    s["c"].clock.wall_ms.ms = LATE_MS + 1_000
    for name in "abc":
        await s[name].kv_put("k", name.encode())
    await deliver(s, "a>b b>c c>a c>b")
    for scope in s.values():
        assert scope.kv.get("k").value == b"c"
        assert scope.kv.conflicts == 2
        losers = sorted(h.value for h in scope.kv.history("k") if h.conflict)
        assert losers == [b"a", b"b"]


DELETE_ROUTES = [
    "b>c a>c c>a c>b",  # the older write reaches C after the delete
    "a>c b>c c>a c>b",
    "a>b b>a a>c",
    "b>a a>b b>c",
]


@pytest.mark.parametrize("route", DELETE_ROUTES)
async def test_a_delete_is_a_write_and_an_older_concurrent_write_does_not_resurrect(
    trio_of_replicas, route
):
    s = trio_of_replicas
    await s["c"].kv_put("k", b"v0")
    await deliver(s, "c>a c>b")
    await s["a"].kv_put("k", b"older")  # EARLY_MS: concurrent with, and older than,
    assert await s["b"].kv_delete("k")  # this delete at LATE_MS
    older_stamp = s["a"].kv.get("k").stamp

    await deliver(s, route)

    for name, scope in s.items():
        assert scope.kv.get("k") is None, name
        assert "k" not in scope.kv.keys()
        history = scope.kv.history("k")
        assert history[0].op == "delete"
        [loser] = records(scope, "k", older_stamp)
        assert (loser.conflict, loser.value) == (True, b"older")


async def test_a_delete_seen_everywhere_stays_a_delete_when_old_updates_are_replayed(
    trio_of_replicas,
):
    s = trio_of_replicas
    await s["a"].kv_put("k", b"v")
    old_update = s["a"].doc("kv").get_update()
    await deliver(s, "a>b")
    await s["b"].kv_delete("k")
    await deliver(s, "b>a b>c")
    for scope in s.values():
        before = scope.kv.last_index
        assert await scope.apply_remote("kv", old_update) == set()
        assert scope.kv.get("k") is None
        assert scope.kv.last_index == before  # a duplicate is not a change


async def test_an_older_delete_loses_to_a_concurrent_later_write(trio_of_replicas):
    s = trio_of_replicas
    await s["c"].kv_put("k", b"v0")
    await deliver(s, "c>a c>b")
    await s["a"].kv_delete("k")  # EARLY_MS
    await s["b"].kv_put("k", b"kept")  # LATE_MS
    await deliver(s, "a>b b>a a>c")
    for scope in s.values():
        assert scope.kv.get("k").value == b"kept"
        assert scope.kv.conflicts == 1
        assert [h.op for h in scope.kv.history("k") if h.conflict] == ["delete"]


@pytest.mark.parametrize("writer", ["a", "c"])
async def test_a_later_write_supersedes_both_conflict_versions(trio_of_replicas, writer):
    s = trio_of_replicas
    await s["a"].kv_put("k", b"early")
    await s["b"].kv_put("k", b"late")
    await sync_all(list(s.values()))
    # A's (and C's) wall clock is behind B's write; the hybrid clock still
    # makes the new write later because it has seen B's stamp.
    await s[writer].kv_put("k", b"final")
    final_stamp = s[writer].kv.get("k").stamp
    await sync_all(list(s.values()))

    for name, scope in s.items():
        assert scope.kv.get("k").value == b"final", name
        assert len(scope.kv.versions.versions("k")) == 1
        history = scope.kv.history("k")
        assert (history[0].stamp, history[0].conflict) == (final_stamp, False)
        assert [h.value for h in history if h.conflict] == [b"early"]
        assert len({h.stamp for h in history}) == len(history) == 3
        assert scope.kv.conflicts == 1


async def test_an_unresolved_conflict_is_listed_once_in_the_history(trio_of_replicas):
    s = trio_of_replicas
    await s["a"].kv_put("k", b"early")
    await s["b"].kv_put("k", b"late")
    await deliver(s, "a>b b>a a>c")
    for scope in s.values():
        stamps = [h.stamp for h in scope.kv.history("k")]
        assert len(stamps) == len(set(stamps)) == 2


# -- Consul semantics ----------------------------------------------------------------


@pytest.fixture
async def scope(open_replica):
    replica = await open_replica()
    return replica.scope("site")


async def test_put_get_overwrite_and_history(scope):
    assert scope.kv.get("a") is None
    assert await scope.kv_put("a", b"one", flags=7)
    assert await scope.kv_put("a", b"two", flags=8)
    entry = scope.kv.get("a")
    assert (entry.value, entry.flags) == (b"two", 8)
    history = scope.kv.history("a")
    assert [(h.op, h.flags, h.size, h.value) for h in history] == [
        ("set", 8, 3, b"two"),
        ("set", 7, 3, None),  # ordinary overwrites keep metadata, not the value
    ]


async def test_history_is_bounded_per_key(open_replica):
    scope = (await open_replica(history_depth=4)).scope("site")
    for i in range(10):
        await scope.kv_put("k", str(i).encode())
    history = scope.kv.history("k")
    assert len(history) == 1 + 4
    assert history[0].value == b"9"
    assert [h.size for h in history[1:]] == [1, 1, 1, 1]


@pytest.mark.parametrize("flags", [0, 1, 2**63, 2**64 - 1])
async def test_flags_round_trip_the_full_unsigned_64_bit_range(open_replica, flags):
    a = (await open_replica("a")).scope("site")
    b = (await open_replica("b")).scope("site")
    await a.kv_put("k", b"v", flags=flags)
    await send(a, b)
    assert a.kv.get("k").flags == b.kv.get("k").flags == flags


async def test_a_key_with_the_largest_flags_can_be_overwritten_and_keeps_them_in_history(scope):
    await scope.kv_put("k", b"one", flags=2**64 - 1)
    assert await scope.kv_put("k", b"two", flags=2**63)
    assert await scope.kv_put("k", b"three")
    assert [h.flags for h in scope.kv.history("k")] == [0, 2**63, 2**64 - 1]


@pytest.fixture
async def tree(scope):
    for key in ["a", "a/b", "a/c/d", "a/c/e", "ab", "b/x", "c"]:
        await scope.kv_put(key, key.encode())
    return scope


async def test_recursive_list_by_prefix(tree):
    assert [e.key for e in tree.kv.list("a/")] == ["a/b", "a/c/d", "a/c/e"]
    assert [e.key for e in tree.kv.list("a")] == ["a", "a/b", "a/c/d", "a/c/e", "ab"]
    assert [e.key for e in tree.kv.list("")] == ["a", "a/b", "a/c/d", "a/c/e", "ab", "b/x", "c"]
    assert tree.kv.list("zzz") == []
    assert [e.value for e in tree.kv.list("a/c/")] == [b"a/c/d", b"a/c/e"]


async def test_keys_with_a_separator_stop_at_the_next_separator(tree):
    assert tree.kv.keys("", "/") == ["a", "a/", "ab", "b/", "c"]
    assert tree.kv.keys("a/", "/") == ["a/b", "a/c/"]
    assert tree.kv.keys("a/c/", "/") == ["a/c/d", "a/c/e"]
    assert tree.kv.keys("a/") == ["a/b", "a/c/d", "a/c/e"]


async def test_recursive_delete_by_prefix(tree):
    before = tree.kv.last_index
    assert await tree.kv_delete("a/", recurse=True)
    assert tree.kv.keys() == ["a", "ab", "b/x", "c"]
    assert tree.kv.last_index == before + 1  # one change, as one Consul transaction
    assert await tree.kv_delete("a", recurse=True)  # a plain string prefix, like Consul
    assert tree.kv.keys() == ["b/x", "c"]
    assert await tree.kv_delete("", recurse=True)
    assert tree.kv.keys() == []


async def test_deleting_a_missing_key_succeeds_and_changes_nothing(scope):
    await scope.kv_put("x", b"v")
    before = scope.kv.last_index
    assert await scope.kv_delete("missing")
    assert await scope.kv_delete("missing/", recurse=True)
    assert scope.kv.last_index == before


async def test_the_index_rises_on_every_local_change(scope):
    seen = [scope.kv.last_index]
    await scope.kv_put("a", b"1")
    created = scope.kv.get("a")
    seen.append(scope.kv.last_index)
    await scope.kv_put("a", b"2")
    seen.append(scope.kv.last_index)
    await scope.kv_put("b", b"1")
    seen.append(scope.kv.last_index)
    await scope.kv_delete("a")
    seen.append(scope.kv.last_index)
    assert seen == sorted(set(seen))
    assert created.create_index == created.modify_index == seen[1]
    updated_b = scope.kv.get("b")
    assert updated_b.modify_index == seen[3]


async def test_the_index_is_per_replica_and_rises_on_remote_changes(open_replica):
    a = (await open_replica("a")).scope("site")
    b = (await open_replica("b")).scope("site")
    for i in range(5):
        await a.kv_put(f"a{i}", b"v")
    await b.kv_put("only-b", b"v")
    b_before = b.kv.last_index

    assert await send(a, b) == {f"a{i}" for i in range(5)}
    assert b.kv.last_index > b_before
    entry = b.kv.get("a4")
    assert entry.create_index == entry.modify_index == b.kv.last_index
    assert a.kv.get("a4").modify_index != entry.modify_index  # each replica counts its own

    await a.kv_put("a4", b"changed")
    a4_create = entry.create_index
    await send(a, b)
    entry = b.kv.get("a4")
    assert entry.value == b"changed"
    assert entry.create_index == a4_create  # an update keeps the local CreateIndex
    assert entry.modify_index == b.kv.last_index

    await a.kv_delete("a0")
    before = b.kv.last_index
    assert await send(a, b) == {"a0"}
    assert b.kv.get("a0") is None
    assert b.kv.last_index == before + 1


# -- check-and-set -------------------------------------------------------------------


async def test_cas_zero_creates_only(scope):
    assert await scope.kv_put("k", b"first", cas=0)
    index = scope.kv.last_index
    assert not await scope.kv_put("k", b"second", cas=0)
    assert scope.kv.get("k").value == b"first"
    assert scope.kv.last_index == index


async def test_cas_matches_the_modify_index_only(scope):
    await scope.kv_put("k", b"v1")
    await scope.kv_put("other", b"x")
    modify = scope.kv.get("k").modify_index
    index = scope.kv.last_index
    assert not await scope.kv_put("k", b"stale", cas=modify + 1)
    assert not await scope.kv_put("k", b"stale", cas=index + 100)
    assert scope.kv.get("k").value == b"v1"
    assert scope.kv.last_index == index

    assert await scope.kv_put("k", b"v2", cas=modify)
    assert scope.kv.get("k").value == b"v2"
    assert not await scope.kv_put("k", b"v3", cas=modify)  # the index moved on


async def test_cas_on_a_missing_key_with_a_nonzero_index_raises(scope):
    await scope.kv_put("present", b"v")
    index = scope.kv.last_index
    with pytest.raises(CasMissingKey) as raised:
        await scope.kv_put("absent", b"v", cas=index)
    assert "cas=0" in str(raised.value)  # tells the user how to create it
    with pytest.raises(CasMissingKey):
        await scope.kv_delete("absent", cas=index)
    assert scope.kv.get("absent") is None
    assert scope.kv.last_index == index


async def test_delete_with_cas(scope):
    await scope.kv_put("k", b"v")
    modify = scope.kv.get("k").modify_index
    assert not await scope.kv_delete("k", cas=modify + 1)
    assert scope.kv.get("k").value == b"v"
    assert await scope.kv_delete("k", cas=modify)
    assert scope.kv.get("k") is None


async def test_cas_uses_the_local_index_of_a_replicated_key(open_replica):
    a = (await open_replica("a")).scope("site")
    b = (await open_replica("b")).scope("site")
    for i in range(3):
        await a.kv_put(f"pad{i}", b"")
    await a.kv_put("k", b"from-a")
    await send(a, b)
    assert await b.kv_put("k", b"from-b", cas=b.kv.get("k").modify_index)
    await send(b, a)
    assert a.kv.get("k").value == b"from-b"


# -- convergence, property-based -------------------------------------------------------

REPLICAS = 3
KEYS = ["a", "a/b", "c"]
replica_ids = st.integers(0, REPLICAS - 1)
puts = st.tuples(
    st.just("put"), replica_ids, st.sampled_from(KEYS), st.binary(max_size=3), st.integers(0, 2)
)
deletes = st.tuples(st.just("delete"), replica_ids, st.sampled_from(KEYS), st.integers(0, 2))
sends = st.tuples(st.just("send"), replica_ids, replica_ids)
restarts = st.tuples(st.just("restart"), replica_ids)
# Restarts are the slow step (closing and opening SQLite): draw them less often.
operations = st.lists(st.one_of(puts, puts, deletes, sends, sends, restarts), max_size=25)


@settings(max_examples=20, deadline=None)
@given(operations)
async def test_replicas_converge_and_lose_no_acknowledged_write(ops):
    """Random writes, partial exchanges and restarts; then a full exchange.

    Every replica must show, for each key, the acknowledged write with the
    highest stamp; a replica keeps every write it acknowledged in the key's
    history; indexes never go backwards; a restart changes nothing visible.
    """
    with tempfile.TemporaryDirectory() as tmp:
        # Clocks 0..2 ms apart, advancing by 0..2 ms: stamps tie on wall time
        # often, so counters and replica ids break ties too.
        walls = [WallClock(BASE_MS + i) for i in range(REPLICAS)]
        acked: list[tuple[int, str, Stamp, bytes | None]] = []
        async with trio.open_nursery() as nursery:

            async def start(i):
                replica = Replica.open(
                    Path(tmp) / str(i), "relaxed", wall_ms=walls[i], history_depth=64
                )
                return await nursery.start(serve, replica)

            nodes = [await start(i) for i in range(REPLICAS)]
            last_index = [0] * REPLICAS

            def scope(i):
                return nodes[i].replica.scope("site")

            for op in ops:
                kind, i = op[0], op[1]
                if kind == "put":
                    _, _, key, value, step = op
                    walls[i].ms += step
                    assert await scope(i).kv_put(key, value)
                    acked.append((i, key, scope(i).kv.get(key).stamp, value))
                elif kind == "delete":
                    _, _, key, step = op
                    walls[i].ms += step
                    existed = scope(i).kv.get(key) is not None
                    assert await scope(i).kv_delete(key)
                    if existed:
                        acked.append((i, key, scope(i).kv.history(key)[0].stamp, None))
                elif kind == "send" and op[2] != i:
                    await send(scope(i), scope(op[2]))
                elif kind == "restart":
                    before = view(scope(i), KEYS)
                    await nodes[i].stop()
                    nodes[i] = await start(i)
                    assert view(scope(i), KEYS) == before
                for j in range(REPLICAS):
                    assert scope(j).kv.last_index >= last_index[j]
                    last_index[j] = scope(j).kv.last_index

            await sync_all([scope(i) for i in range(REPLICAS)])

            for key in KEYS:
                writes = [(stamp, value) for _, k, stamp, value in acked if k == key]
                winner = max(writes, default=(None, None))
                for i in range(REPLICAS):
                    entry = scope(i).kv.get(key)
                    if winner[1] is None:
                        assert entry is None
                    else:
                        assert (entry.stamp, entry.value) == winner
                    assert scope(i).kv.versions.versions(key) == scope(0).kv.versions.versions(key)
            for i, key, stamp, _ in acked:
                assert stamp in {h.stamp for h in scope(i).kv.history(key)}
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "value,flags,expires",
    [(b"v", 0, None), (b"", 0, None), (b"\x83v", 0, None), (b"v", 7, None), (b"v", 0, 123), (b"", 2**64 - 1, 5)],
)
def test_payloads_round_trip_and_plain_writes_skip_cbor(value, flags, expires):
    payload = encode_payload(value, flags, expires)
    assert payload  # an empty payload is a tombstone
    assert decode_payload(payload) == (value, flags, expires)
    if not flags and expires is None:
        assert payload == b"\x00" + value


def test_payloads_written_before_the_plain_form_still_decode():
    assert decode_payload(cbor2.dumps([b"old", 0, None])) == (b"old", 0, None)
    assert decode_payload(cbor2.dumps([b"", 3, 99])) == (b"", 3, 99)

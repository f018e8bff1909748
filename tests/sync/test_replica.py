"""A replica: its identity, its scopes across restarts, and the TTL reaper.

TTL tests run on trio's MockClock (the ``mock_clock`` fixture: time moves only
when the test jumps it) and give the replica a wall clock that follows it, so
the reaper's sleeps are virtual. After each jump, ``wait_all_tasks_blocked``
lets every task run; what must happen (a key expiring) is then awaited as a
condition, since the reaper may still be committing its previous change.
"""

from __future__ import annotations

from sync_support import BASE_MS, WallClock, eventually, running, send, trio_wall_ms
from trio.testing import wait_all_tasks_blocked

from konsul.sync.replica import Replica


async def advance(mock_clock, seconds: float) -> None:
    mock_clock.jump(seconds)
    await wait_all_tasks_blocked()


async def test_a_key_with_a_ttl_disappears_after_it_and_the_index_rises(open_replica, mock_clock):
    scope = (await open_replica(wall_ms=trio_wall_ms)).scope("site")
    await scope.kv_put("session/a", b"1", ttl_ms=10_000)
    await scope.kv_put("plain", b"2")
    assert scope.kv.get("session/a").expires_ms == BASE_MS + 10_000
    index = scope.kv.last_index

    await advance(mock_clock, 9)
    assert scope.kv.get("session/a").value == b"1"
    assert scope.kv.last_index == index

    await advance(mock_clock, 1)
    await eventually(lambda: scope.kv.get("session/a") is None, "session/a expired")
    assert scope.kv.keys() == ["plain"]
    assert scope.kv.last_index == index + 1

    await advance(mock_clock, 3600)
    assert scope.kv.last_index == index + 1  # nothing more to expire


async def test_rewriting_a_key_extends_its_ttl(open_replica, mock_clock):
    scope = (await open_replica(wall_ms=trio_wall_ms)).scope("site")
    await scope.kv_put("lease", b"v1", ttl_ms=10_000)
    await advance(mock_clock, 6)
    await scope.kv_put("lease", b"v2", ttl_ms=10_000)  # now due at 16 s
    await advance(mock_clock, 6)
    assert scope.kv.get("lease").value == b"v2"
    await advance(mock_clock, 3)
    assert scope.kv.get("lease").value == b"v2"
    await advance(mock_clock, 1)
    await eventually(lambda: scope.kv.get("lease") is None, "the lease expired")


async def test_rewriting_without_a_ttl_keeps_the_key(open_replica, mock_clock):
    scope = (await open_replica(wall_ms=trio_wall_ms)).scope("site")
    await scope.kv_put("k", b"temporary", ttl_ms=5_000)
    await scope.kv_put("k", b"permanent")
    await advance(mock_clock, 3600)
    assert scope.kv.get("k").value == b"permanent"


async def test_keys_expire_in_order_of_their_deadlines(open_replica, mock_clock):
    scope = (await open_replica(wall_ms=trio_wall_ms)).scope("site")
    await scope.kv_put("late", b"", ttl_ms=30_000)
    await scope.kv_put("early", b"", ttl_ms=10_000)
    await scope.kv_put("middle", b"", ttl_ms=20_000)
    await advance(mock_clock, 9)
    assert scope.kv.keys() == ["early", "late", "middle"]
    for left in (["late", "middle"], ["late"], []):
        await advance(mock_clock, 1)
        await eventually(lambda: scope.kv.keys() == left, f"only {left} remain")
        await advance(mock_clock, 9)
        assert scope.kv.keys() == left


async def test_a_replicated_ttl_expires_at_the_same_time_everywhere(open_replica, mock_clock):
    a = (await open_replica("a", wall_ms=trio_wall_ms)).scope("site")
    b = (await open_replica("b", wall_ms=trio_wall_ms)).scope("site")
    await a.kv_put("session", b"s", ttl_ms=10_000)
    await advance(mock_clock, 5)
    await send(a, b)
    assert b.kv.get("session").expires_ms == BASE_MS + 10_000
    b_index = b.kv.last_index
    await advance(mock_clock, 5)
    await eventually(
        lambda: a.kv.get("session") is None and b.kv.get("session") is None,
        "the session expired on both replicas",
    )
    assert b.kv.last_index == b_index + 1


async def test_a_ttl_survives_a_restart(tmp_path, mock_clock):
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as replica:
        await replica.scope("site").kv_put("k", b"v", ttl_ms=10_000)
    await advance(mock_clock, 5)
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as replica:
        scope = replica.scope("site")
        assert scope.kv.get("k").value == b"v"
        await advance(mock_clock, 5)
        await eventually(lambda: scope.kv.get("k") is None, "k expired")
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as replica:
        assert replica.scope("site").kv.get("k") is None


async def test_a_key_that_expired_while_the_replica_was_down_is_gone_at_start(tmp_path, mock_clock):
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as replica:
        await replica.scope("site").kv_put("k", b"v", ttl_ms=10_000)
        await replica.scope("site").kv_put("other", b"v")
    await advance(mock_clock, 60)
    async with running(Replica.open(tmp_path, wall_ms=trio_wall_ms)) as replica:
        assert replica.scope("site").kv.keys() == ["other"]


async def test_identity_and_scopes_are_kept_across_restarts(tmp_path):
    wall = WallClock()
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        identity = replica.replica_id
        await replica.scope("global").kv_put("fleet", b"g")
        await replica.scope("site1").kv_put("local", b"s")
        stamp = replica.scope("site1").kv.get("local").stamp
    assert stamp.replica == identity

    wall.ms -= 60_000  # the wall clock went back while we were down
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        assert replica.replica_id == identity
        assert sorted(replica.scopes) == ["global", "site1"]
        assert replica.scope("global").kv.get("fleet").value == b"g"
        await replica.scope("site1").kv_put("local", b"again")
        assert replica.scope("site1").kv.get("local").stamp > stamp


async def test_replicas_in_different_directories_have_different_identities(open_replica):
    a = await open_replica("a")
    b = await open_replica("b")
    assert a.replica_id != b.replica_id


async def test_a_ttl_runs_on_this_replicas_clock_after_a_stamp_from_the_far_future(open_replica, mock_clock):
    # A peer once stamped its writes in the year 6429: stamps after it carried
    # that time, and TTL keys, whose expiry came from their stamp, never expired.
    from konsul.sync.hlc import Stamp

    replica = await open_replica(wall_ms=trio_wall_ms)
    scope = replica.scope("site")
    replica.clock.observe(Stamp(140_800_000_000_000, 0, "0000000000ff"))
    await scope.kv_put("session/a", b"1", ttl_ms=10_000)
    assert scope.kv.get("session/a").expires_ms == BASE_MS + 10_000

    await advance(mock_clock, 10)
    await eventually(lambda: scope.kv.get("session/a") is None, "session/a expired")

"""A scope: change notifications and compaction into a new document epoch."""

from __future__ import annotations

import trio
from sync_support import BASE_MS, WallClock, running, send, view

from konsul.sync.catalog import ServiceEntry
from konsul.sync.replica import Replica
from konsul.sync.scope import COMPACTION_FACTOR, MIN_COMPACTION_BYTES

KEYS = ["cfg/flags", "cfg/ttl", "conflicted", "deleted", "hot"]


def blob(seed: int, size: int = 2_000) -> bytes:
    return bytes((seed * 7 + i * 13) % 256 for i in range(size))


async def settle_some_content(a, b) -> None:
    """Content compaction must keep: flags, a TTL, a conflict, a delete, history."""
    await a.kv_put("cfg/flags", b"f", flags=2**64 - 1)
    await a.kv_put("cfg/ttl", b"t", ttl_ms=24 * 3_600_000)
    await a.kv_put("deleted", b"d")
    await a.kv_delete("deleted")
    await a.kv_put("conflicted", b"from-a")
    await b.kv_put("conflicted", b"from-b")
    await send(b, a)


async def test_compaction_keeps_the_content_and_bounds_what_is_stored(tmp_path):
    walls = [WallClock(BASE_MS), WallClock(BASE_MS + 1_000)]
    async with running(Replica.open(tmp_path / "a", wall_ms=walls[0])) as replica:
        async with running(Replica.open(tmp_path / "b", wall_ms=walls[1])) as other:
            await settle_some_content(replica.scope("site"), other.scope("site"))
        scope = replica.scope("site")
        assert scope.kv.conflicts == 1

        # Listeners run once a change is durable, before any compaction it
        # triggers: what they see is the content compaction must preserve.
        seen = []
        scope.listeners.append(lambda collection, keys: seen.append(view(scope, KEYS)))
        written = 0
        peak = 0
        while scope.compactions < 3:
            written += 1
            assert written < 1_000, "overwrites never triggered a compaction"
            before = scope.compactions
            await scope.kv_put("hot", blob(written), flags=written)
            if scope.compactions > before:
                assert view(scope, KEYS) == seen[-1]
                assert scope.epoch("kv") == 1 + scope.compactions
            peak = max(peak, scope.stored_bytes())

        live = scope.kv.versions.live_bytes
        assert peak <= COMPACTION_FACTOR * live + MIN_COMPACTION_BYTES + 2 * len(blob(0))
        assert peak < written * len(blob(0)) / 2
        assert scope.kv.get("hot").value == blob(written)
        assert [h.value for h in scope.kv.history("conflicted") if h.conflict] == [b"from-a"]
        final = view(scope, KEYS)
        stored = scope.stored_bytes()

        # A replica that joins now gets the whole content from the new epoch.
        async with running(Replica.open(tmp_path / "c", wall_ms=WallClock())) as joiner:
            fresh = joiner.scope("site")
            await send(scope, fresh)
            assert [(e.key, e.value, e.flags, e.stamp) for e in fresh.kv.list("")] == [
                (e.key, e.value, e.flags, e.stamp) for e in final["entries"]
            ]
            assert [h.value for h in fresh.kv.history("conflicted") if h.conflict] == [b"from-a"]

    async with running(Replica.open(tmp_path / "a", wall_ms=walls[0])) as replica:
        scope = replica.scope("site")
        assert view(scope, KEYS) == final
        assert scope.stored_bytes() == stored
        assert scope.epoch("kv") == 4


async def test_writes_racing_a_compaction_are_all_kept(tmp_path):
    wall = WallClock()
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")

        async def overwrite(key: str) -> None:
            for i in range(40):
                await scope.kv_put(key, blob(i) + key.encode())

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(overwrite, f"w{n}")
        assert scope.compactions > 0
        final = view(scope)
        expected = [blob(39) + f"w{n}".encode() for n in range(4)]
        assert [e.value for e in final["entries"]] == expected

    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        assert view(replica.scope("site")) == final


async def test_the_catalog_is_compacted_too(tmp_path):
    wall = WallClock()
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        await scope.register_service(ServiceEntry("node1", "db", "db", port=5432))
        for i in range(200):
            meta = {"blob": blob(i).hex()}
            await scope.register_service(ServiceEntry("node1", "web", "web", port=80, meta=meta))
            if scope.compactions:
                break
        assert scope.compactions == 1
        assert scope.epoch("catalog") == 2
        services = scope.catalog.services()
        assert [s.service_id for s in services] == ["db", "web"]
        assert services[1].meta == {"blob": blob(i).hex()}

    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        assert replica.scope("site").catalog.services() == services


async def test_listeners_hear_of_durable_local_and_remote_changes(open_replica):
    a = (await open_replica("a")).scope("site")
    b = (await open_replica("b")).scope("site")
    heard = []
    b.listeners.append(lambda collection, keys: heard.append((collection, keys)))
    await b.kv_put("x", b"1")
    await b.kv_delete("x")
    await a.kv_put("y/1", b"1")
    await a.kv_put("y/2", b"2")
    await send(a, b)
    await b.register_service(ServiceEntry("n", "s", "s"))
    assert not await b.kv_put("y/1", b"cas", cas=0)  # a failed CAS is not a change
    assert heard == [
        ("kv", {"x"}),
        ("kv", {"x"}),
        ("kv", {"y/1", "y/2"}),
        ("catalog", {"n/s"}),
    ]

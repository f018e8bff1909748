"""The SQLite store, seen through a replica: restarts, damage, locks, a full disk."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import trio
from sync_support import BASE_MS, WallClock, eventually, running, send, view

from konsul.sync.catalog import CheckDefinition, ServiceEntry
from konsul.sync.errors import StoreCorrupt, StoreError, StoreFull, StoreLocked
from konsul.sync.replica import Replica
from konsul.sync.kv import TRIM_ROWS
from konsul.sync.store import DB_NAME, SCHEMA_VERSION
from konsul.sync.tables import ROWS_PER_STATEMENT, kv_rows, scope_counters

KEYS = ["cfg/a", "cfg/b", "cfg/big", "conflicted", "gone/x", "gone/y", "ttl"]


async def fill(a, b) -> None:
    """Give two scopes values, flags, history, deletes, a conflict, a TTL, a service."""
    await a.kv_put("cfg/a", b"1", flags=2**64 - 1)
    for flags in (2**64 - 1, 2**63, 0, 1, 2):  # overwritten flags go into the history
        await a.kv_put("cfg/b", f"v{flags}".encode(), flags=flags)
    await a.kv_put("cfg/big", bytes(range(256)) * 1024)
    await a.kv_put("gone/x", b"x")
    await a.kv_put("gone/y", b"y")
    await a.kv_delete("gone/", recurse=True)
    await a.kv_put("ttl", b"t", ttl_ms=3_600_000)
    await a.kv_put("conflicted", b"from-a")
    await b.kv_put("conflicted", b"from-b")  # b's clock is ahead: b wins
    await send(b, a)
    await send(a, b)
    await a.register_service(
        ServiceEntry(
            "node1",
            "web-1",
            "web",
            "10.0.0.5",
            8080,
            ("primary",),
            {"v": "2"},
            (CheckDefinition("c1", "alive", "http", "http://10.0.0.5:8080/health"),),
        )
    )
    await send(a, b, "catalog")


async def test_a_restart_rebuilds_exactly_the_same_state(tmp_path):
    walls = {"a": WallClock(BASE_MS), "b": WallClock(BASE_MS + 10)}
    before = {}
    async with running(Replica.open(tmp_path / "a", wall_ms=walls["a"])) as ra:
        async with running(Replica.open(tmp_path / "b", wall_ms=walls["b"])) as rb:
            await fill(ra.scope("site"), rb.scope("site"))
            await ra.scope("global").kv_put("fleet/x", b"g")
            for name, replica in (("a", ra), ("b", rb)):
                before[name] = (
                    replica.replica_id,
                    {s: view(scope, KEYS) for s, scope in replica.scopes.items()},
                )
    assert before["a"][1]["site"]["conflicts"] == 1
    assert before["a"][1]["site"]["history"]["conflicted"][1].value == b"from-a"

    for name, wall in walls.items():
        async with running(Replica.open(tmp_path / name, wall_ms=wall)) as replica:
            scopes = {s: view(scope, KEYS) for s, scope in replica.scopes.items()}
            assert (replica.replica_id, scopes) == before[name]
            # and the index carries on: never back to one a client has seen
            scope = replica.scope("site")
            index = scope.kv.last_index
            await scope.kv_put("cfg/a", b"2")
            assert scope.kv.get("cfg/a").modify_index == scope.kv.last_index > index
            [first] = [e for e in before[name][1]["site"]["entries"] if e.key == "cfg/a"]
            assert scope.kv.get("cfg/a").create_index == first.create_index


async def test_an_acknowledged_write_is_on_disk_before_the_replica_closes(tmp_path, open_replica):
    replica = await open_replica("live")
    scope = replica.scope("site")
    await scope.kv_put("k", b"durable", flags=5)
    # Copy the files as a crash would leave them: the replica is still running.
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal"):
        source = tmp_path / "live" / (DB_NAME + suffix)
        if source.exists():
            shutil.copyfile(source, copy / source.name)
    async with running(Replica.open(copy, wall_ms=WallClock())) as recovered:
        entry = recovered.scope("site").kv.get("k")
        assert (entry.value, entry.flags) == (b"durable", 5)


async def test_concurrent_writes_commit_together_and_all_survive(tmp_path):
    async with running(Replica.open(tmp_path, wall_ms=WallClock())) as replica:
        scope = replica.scope("site")
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(scope.kv_put, f"k{i:02d}", str(i).encode())
        assert len(scope.kv.list("")) == 64
        # Puts that arrive together share one CRDT update and one batch, and
        # batches that arrive together one transaction.
        assert replica.store.rounds <= replica.store.batches < 64
        (updates,) = replica.store.query("SELECT count(*) FROM updates WHERE scope = 'site'")[0]
        assert updates == replica.store.batches
    async with running(Replica.open(tmp_path, wall_ms=WallClock())) as replica:
        assert [e.value for e in replica.scope("site").kv.list("")] == [
            str(i).encode() for i in range(64)
        ]


# -- a damaged database --------------------------------------------------------------


def garbage(size: int) -> bytes:
    return bytes((i * 131 + 17) % 251 for i in range(size))


def replace_file(path, data: bytes) -> None:
    path.write_bytes(data)


def damage_header(path) -> None:
    data = path.read_bytes()
    path.write_bytes(garbage(100) + data[100:])


def damage_pages(path) -> None:
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 3 * page
    path.write_bytes(data[:page] + garbage(len(data) - page))


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: replace_file(path, garbage(10_000)),
        lambda path: replace_file(path, b"SQLite format 3\x00" + garbage(4_000)),
        damage_header,
        damage_pages,
    ],
    ids=["garbage file", "truncated after the magic", "damaged header", "damaged pages"],
)
async def test_a_corrupt_database_is_reported_by_name_and_left_untouched(tmp_path, damage):
    data_dir = tmp_path / "data"
    async with running(Replica.open(data_dir, wall_ms=WallClock())) as replica:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(replica.scope("site").kv_put, f"k{i}", garbage(400))
    db = data_dir / DB_NAME
    damage(db)
    damaged = db.read_bytes()

    with pytest.raises(StoreCorrupt) as raised:
        Replica.open(data_dir)
    assert str(db) in str(raised.value)
    assert "untouched" in str(raised.value)
    assert db.read_bytes() == damaged
    # SQLite's read-only check of a WAL-mode file may leave an empty WAL (and
    # its index) beside it; nothing that could ever be replayed into the file.
    wal = data_dir / (DB_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0

    # The refused start-up released the directory: once the user moves the
    # file away, the same process can start with an empty store.
    db.rename(tmp_path / "konsul.db.broken")
    async with running(Replica.open(data_dir, wall_ms=WallClock())) as replica:
        assert replica.scope("site").kv.list("") == []


# -- a data directory in use ---------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from konsul.sync.replica import Replica
    replica = Replica.open(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.read()  # hold the directory until the test closes our stdin
    replica.close()
    """
)


def test_a_data_dir_held_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(StoreLocked) as raised:
            Replica.open(tmp_path)
        assert str(holder.pid) in str(raised.value)
        assert str(tmp_path) in str(raised.value)
        assert "--data-dir" in str(raised.value)  # says what to do
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    Replica.open(tmp_path).close()  # free once the holder has gone


def test_a_data_dir_is_exclusive_within_one_process_too(tmp_path):
    first = Replica.open(tmp_path)
    try:
        with pytest.raises(StoreLocked):
            Replica.open(tmp_path)
    finally:
        first.close()
    Replica.open(tmp_path).close()


# -- a full disk -----------------------------------------------------------------------


async def test_a_full_disk_fails_the_write_and_keeps_earlier_data(tmp_path):
    wall = WallClock()
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        for i in range(10):
            await scope.kv_put(f"k{i}", f"v{i}".encode(), flags=i)
        await scope.kv_put("k0", b"v0-again")
        await scope.register_service(ServiceEntry("node1", "db", "db", port=5432))
        before = view(scope, ["k0"])

        # Simulate a full disk with SQLite's max_page_count on the store's own
        # connection: the database may not grow beyond the pages it has now.
        [(pages,)] = replica.store.query("PRAGMA page_count")
        replica.store.query(f"PRAGMA max_page_count = {pages}")

        with pytest.raises(StoreError) as raised:
            await scope.kv_put("big", bytes(400_000))
        assert isinstance(raised.value, StoreFull)
        assert "full" in str(raised.value)
        # Memory shows only what the disk holds.
        assert scope.kv.get("big") is None
        assert view(scope, ["k0"]) == before

        # Space comes back: writing works again without a restart.
        replica.store.query("PRAGMA max_page_count = 1073741823")
        assert await scope.kv_put("after", b"ok")

    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        assert scope.kv.get("big") is None
        assert scope.kv.get("after").value == b"ok"
        await scope.kv_delete("after")
        after = view(scope, ["k0"])
        assert after["entries"] == before["entries"]
        assert after["history"] == before["history"]
        assert after["services"] == before["services"]


# -- schema versions ---------------------------------------------------------------------

# The tables whose layout changed in schema version 2, as version 1 created them.
V1_TABLES = """
CREATE TABLE updates(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL, collection TEXT NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE kv_history(
    scope TEXT, key TEXT, stamp TEXT, op TEXT NOT NULL, flags INTEGER NOT NULL,
    size INTEGER NOT NULL, conflict INTEGER NOT NULL, value BLOB,
    PRIMARY KEY(scope, key, stamp)) WITHOUT ROWID;
"""


def downgrade_to_v1(db) -> None:
    """Rewrite a closed database as version 1 would have left it.

    Version 1 kept the counters in scope_state and every index and history row
    in its table: fold what the log carries into them, then restore the old
    layout of updates and kv_history.
    """
    conn = sqlite3.connect(db, isolation_level=None)

    def query(sql: str, *params):
        return conn.execute(sql, params).fetchall()

    try:
        conn.execute("BEGIN")
        for (scope,) in query("SELECT DISTINCT scope FROM updates"):
            conn.execute("INSERT OR REPLACE INTO scope_state VALUES (?, ?, ?, ?)", (scope, *scope_counters(query, scope)))
            index, history = kv_rows(query, scope)
            conn.execute("DELETE FROM kv_index WHERE scope = ?", (scope,))
            conn.execute("DELETE FROM kv_history WHERE scope = ?", (scope,))
            conn.executemany("INSERT INTO kv_index VALUES (?, ?, ?, ?)", [(scope, *row) for row in index])
            conn.executemany(
                "INSERT INTO kv_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(scope, *row) for row in history]
            )
        conn.execute("ALTER TABLE updates RENAME TO updates_v2")
        conn.execute("ALTER TABLE kv_history RENAME TO kv_history_v2")
        for statement in V1_TABLES.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO updates SELECT seq, scope, collection, epoch, data FROM updates_v2")
        conn.execute("INSERT INTO kv_history SELECT * FROM kv_history_v2")
        conn.execute("DROP TABLE updates_v2")
        conn.execute("DROP TABLE kv_history_v2")
        conn.execute("UPDATE meta SET value = 1 WHERE name = 'schema_version'")
        conn.execute("COMMIT")
    finally:
        conn.close()


def table_sql(db, name: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


async def test_a_version_1_data_dir_is_migrated_and_reads_the_same(tmp_path):
    walls = {"a": WallClock(BASE_MS), "b": WallClock(BASE_MS + 10)}
    async with running(Replica.open(tmp_path / "a", wall_ms=walls["a"])) as ra:
        async with running(Replica.open(tmp_path / "b", wall_ms=walls["b"])) as rb:
            await fill(ra.scope("site"), rb.scope("site"))
            for i in range(20):  # more log rows and history to carry over
                await ra.scope("site").kv_put("cfg/a", str(i).encode())
            before = view(ra.scope("site"), KEYS)
    db = tmp_path / "a" / DB_NAME
    downgrade_to_v1(db)
    assert "AUTOINCREMENT" in table_sql(db, "updates")

    async with running(Replica.open(tmp_path / "a", wall_ms=walls["a"])) as replica:
        scope = replica.scope("site")
        assert view(scope, KEYS) == before
        assert replica.store.meta("schema_version") == SCHEMA_VERSION == 2
        assert "PRIMARY KEY(scope, stamp, key)" in table_sql(db, "kv_history")
        assert "AUTOINCREMENT" not in table_sql(db, "updates")
        assert not replica.store.query("SELECT name FROM sqlite_master WHERE name LIKE '%_v1'")
        await scope.kv_put("cfg/a", b"after")
        after = view(scope, KEYS)
    async with running(Replica.open(tmp_path / "a", wall_ms=walls["a"])) as replica:
        assert view(replica.scope("site"), KEYS) == after
        assert after["history"]["cfg/a"][1].size == len(b"19")


def test_a_data_dir_of_an_unknown_newer_schema_is_refused_and_left_untouched(tmp_path):
    Replica.open(tmp_path).close()
    db = tmp_path / DB_NAME
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    conn.close()
    content = db.read_bytes()
    with pytest.raises(StoreError) as raised:
        Replica.open(tmp_path)
    assert "schema version 99" in str(raised.value)
    assert str(db) in str(raised.value)
    assert db.read_bytes() == content
    with pytest.raises(StoreError):  # and again: the refusal released the directory
        Replica.open(tmp_path)


async def test_history_past_its_depth_is_trimmed_from_disk_in_bulk(tmp_path):
    keys = [f"k{i}" for i in range(3)]
    async with running(Replica.open(tmp_path, wall_ms=WallClock(), history_depth=2)) as replica:
        scope = replica.scope("site")
        for round_ in range(TRIM_ROWS):
            for key in keys:
                await scope.kv_put(key, str(round_).encode())
        rows = len(kv_rows(replica.store.query, "site")[1])  # what a restart reads
        # Each key keeps 2 rows; at most TRIM_ROWS dropped ones wait to be deleted.
        assert len(keys) * 2 <= rows < len(keys) * 2 + TRIM_ROWS
        before = view(scope, keys)
        assert all(len(before["history"][key]) == 1 + 2 for key in keys)
    # After a restart memory shows the same, and the rows left over go later.
    async with running(Replica.open(tmp_path, wall_ms=WallClock(), history_depth=2)) as replica:
        scope = replica.scope("site")
        assert view(scope, keys) == before
        for round_ in range(TRIM_ROWS):
            await scope.kv_put(keys[0], b"x")
        assert len(kv_rows(replica.store.query, "site")[1]) < len(keys) * 2 + TRIM_ROWS
        await scope.compact("kv")  # the log's rows move to the table, trimmed ones go
        [(rows,)] = replica.store.query("SELECT count(*) FROM kv_history")
        assert len(keys) * 2 <= rows < len(keys) * 2 + TRIM_ROWS


# -- giving space back ---------------------------------------------------------------------


async def test_compaction_gives_a_large_freed_log_back_and_checkpoints_in_the_background(tmp_path):
    async with running(Replica.open(tmp_path, wall_ms=WallClock())) as replica:
        scope = replica.scope("site")
        scope.auto_compact = False
        for i in range(400):
            await scope.kv_put(f"big/{i}", bytes(4000))
        await scope.kv_delete("big/", recurse=True)
        [(pages_before,)] = replica.store.query("PRAGMA page_count")
        await scope.compact("kv")
        # The freed log (about 400 pages of 4 KiB) went back to the file system.
        [(free,)] = replica.store.query("PRAGMA freelist_count")
        [(pages,)] = replica.store.query("PRAGMA page_count")
        assert free == 0
        assert pages < pages_before / 2
        # The compaction asked for a checkpoint, which runs on its own thread.
        await eventually(lambda: replica.store._checkpointer.runs > 0, "the checkpoint has run")
    async with running(Replica.open(tmp_path, wall_ms=WallClock())) as replica:
        assert replica.scope("site").kv.list("") == []


def test_checkpoint_gives_every_free_page_back(tmp_path):
    async def fill_and_empty(replica):
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("site")
            scope.auto_compact = False
            for i in range(50):
                await scope.kv_put(f"k{i}", bytes(4000))
            await scope.kv_delete("k", recurse=True)
            await scope.compact("kv")
            nursery.cancel_scope.cancel()

    replica = Replica.open(tmp_path, wall_ms=WallClock())
    try:
        trio.run(fill_and_empty, replica)
        replica.store.checkpoint()  # the writer has stopped: allowed now
        assert replica.store.query("PRAGMA freelist_count") == [(0,)]
        assert not (tmp_path / (DB_NAME + "-wal")).exists() or (
            (tmp_path / (DB_NAME + "-wal")).stat().st_size == 0
        )
    finally:
        replica.close()


async def test_the_counters_survive_restarts_around_compactions(tmp_path):
    """idx, kv_index and conflicts ride on the update rows and move to scope_state
    when a compaction drops the log: a restart at any point finds them again."""
    wall = WallClock()

    def counters(scope):
        return (scope.index.value, scope.kv.last_index, scope.conflicts())

    async def reopened():
        async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
            return counters(replica.scope("site"))

    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        scope.auto_compact = False
        for i in range(20):
            await scope.kv_put(f"k{i % 3}", str(i).encode())
        await scope.register_service(ServiceEntry("node1", "db", "db", port=5432))
        seen = counters(scope)
    assert await reopened() == seen
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        scope.auto_compact = False
        await scope.compact("kv")  # the last thing before the restart
        seen = counters(scope)
        assert replica.store.query("SELECT count(*) FROM updates WHERE collection = 'kv'") == [(0,)]
    assert await reopened() == seen
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        await scope.kv_put("k0", b"after")
        await scope.compact("catalog")
        await scope.compact("kv")
        seen = counters(scope)
    assert await reopened() == seen
    assert seen[0] > 21


async def test_index_and_history_rows_ride_on_the_log_until_a_compaction_folds_them(tmp_path):
    wall = WallClock()
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        scope.auto_compact = False
        await scope.kv_put("a", b"1")
        await scope.kv_put("a", b"2")  # a history row for "a"
        await scope.kv_put("ttl", b"t", ttl_ms=1_000)
        # A put writes its index and history rows with its update, not in the tables.
        assert replica.store.query("SELECT count(*) FROM kv_index") == [(0,)]
        assert replica.store.query("SELECT count(*) FROM kv_history") == [(0,)]
        index, history = kv_rows(replica.store.query, "site")
        assert sorted(row[0] for row in index) == ["a", "ttl"]
        assert [row[0] for row in history] == ["a"]

        # An expiry changes the index without an update: the log goes to the
        # tables first, then the expiry, so nothing older overrides it.
        wall.ms += 2_000
        assert await scope.expire_due() == ["ttl"]
        assert replica.store.query("SELECT key FROM kv_index") == [("a",)]
        assert replica.store.query("SELECT count(*) FROM updates WHERE side IS NOT NULL") == [(0,)]
        await scope.kv_put("b", b"3")
        assert sorted(row[0] for row in kv_rows(replica.store.query, "site")[0]) == ["a", "b"]
        before = view(scope, ["a", "b", "ttl"])
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        scope = replica.scope("site")
        scope.auto_compact = False
        assert view(scope, ["a", "b", "ttl"]) == before
        await scope.compact("kv")  # which also turns the expired "ttl" into a tombstone
        before = view(scope, ["a", "b"])
        assert sorted(replica.store.query("SELECT key FROM kv_index")) == [("a",), ("b",)]
        assert replica.store.query("SELECT key FROM kv_history") == [("a",)]
    async with running(Replica.open(tmp_path, wall_ms=wall)) as replica:
        assert view(replica.scope("site"), ["a", "b"]) == before


@pytest.mark.parametrize("variable_limit", [None, 999], ids=["default", "sqlite-before-3.32"])
async def test_a_fold_larger_than_one_statement_writes_and_deletes_every_row(tmp_path, variable_limit):
    """Folded rows go to the tables in multi-row statements of up to
    ROWS_PER_STATEMENT rows (fewer where SQLite allows fewer parameters: 999
    before 3.32); a fold of several statements' worth keeps, replaces and
    deletes exactly the rows the log says, in every scope, and a restart reads
    them back."""
    keys = [f"k/{i:04d}" for i in range(2 * ROWS_PER_STATEMENT + 7)]
    async with running(Replica.open(tmp_path, wall_ms=WallClock(), history_depth=1)) as replica:
        if variable_limit is not None:
            replica.store._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variable_limit)
        for name in ("site", "global"):
            scope = replica.scope(name)
            scope.auto_compact = False
            for round_ in range(3):  # 3 versions: 1 live, 1 in the history, 1 trimmed
                async with trio.open_nursery() as nursery:
                    for key in keys:
                        nursery.start_soon(scope.kv_put, key, f"{round_}".encode())
            await scope.kv_delete("k/00", recurse=True)  # deletes in the index (k/0000..k/0099)
            await scope.compact("kv")
        before = {name: view(replica.scope(name), keys) for name in ("site", "global")}
        for name in ("site", "global"):
            [(index_rows,)] = replica.store.query("SELECT count(*) FROM kv_index WHERE scope = ?", name)
            assert index_rows == len(keys) - 100
            [(history_rows,)] = replica.store.query("SELECT count(*) FROM kv_history WHERE scope = ?", name)
            # One past version per key, fewer the trimmed rows still waiting for a bulk delete.
            assert len(keys) <= history_rows < len(keys) + TRIM_ROWS
            assert replica.store.query("SELECT count(*) FROM updates WHERE scope = ? AND collection = 'kv'", name) == [(0,)]
    async with running(Replica.open(tmp_path, wall_ms=WallClock(), history_depth=1)) as replica:
        assert {name: view(replica.scope(name), keys) for name in ("site", "global")} == before

"""The one durable SQLite writer: group commit, all-or-nothing rounds, checked opening."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import trio
import trio.testing

from konsul.sync.errors import StoreCorrupt, StoreError
from konsul.sync.sqlite_writer import SqliteWriter, connect_writer


def open_writer(path) -> SqliteWriter:
    conn = connect_writer(path, "full", lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)"))
    return SqliteWriter(path, conn)


def stored(path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [v for (v,) in db.execute("SELECT v FROM t ORDER BY v")]


async def test_writes_that_arrive_together_share_a_round_and_each_gets_its_result(tmp_path):
    path = tmp_path / "w.db"
    writer = open_writer(path)
    held, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> str:
        held.set()
        release.wait(10)
        return "held"

    def insert(value: int):
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
            return value * 10
        return run

    results: dict[int, int] = {}

    async def write(value: int) -> None:
        results[value] = await writer.transact(insert(value))

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as writers:
            writers.start_soon(writer.transact, hold)
            await trio.to_thread.run_sync(held.wait, 10)  # the writer thread is busy with the first round
            for value in range(20):
                writers.start_soon(write, value)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        nursery.cancel_scope.cancel()
    writer.close()
    assert results == {value: value * 10 for value in range(20)}
    assert writer.rounds == 2  # the held one, then the twenty together
    assert stored(path) == list(range(20))


async def test_a_failing_write_fails_its_whole_round_and_nothing_of_it_is_stored(tmp_path):
    path = tmp_path / "w.db"
    writer = open_writer(path)
    failures: list[BaseException] = []
    held, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        held.set()
        release.wait(10)

    async def write(value: int) -> None:
        try:
            await writer.transact(lambda conn: conn.execute("INSERT INTO t (v) VALUES (?)", (value,)))
        except StoreError as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.transact(lambda conn: conn.execute("INSERT INTO t (v) VALUES (1)"))
        async with trio.open_nursery() as writers:
            writers.start_soon(writer.transact, hold)
            await trio.to_thread.run_sync(held.wait, 10)
            writers.start_soon(write, 2)
            writers.start_soon(write, 1)  # UNIQUE: fails, and takes 2 with it
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        await writer.transact(lambda conn: conn.execute("INSERT INTO t (v) VALUES (3)"))  # and writing goes on
        nursery.cancel_scope.cancel()
    writer.close()
    assert len(failures) == 2
    assert stored(path) == [1, 3]


def test_a_damaged_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "w.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreCorrupt, match="left untouched"):
        open_writer(path)
    assert path.read_bytes() == b"not a database at all" * 100


async def test_writes_after_the_writer_stopped_are_refused(tmp_path):
    writer = open_writer(tmp_path / "w.db")
    with pytest.raises(StoreError, match="not running"):
        await writer.transact(lambda conn: None)
    writer.close()

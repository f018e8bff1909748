"""Store benchmark: durable KV puts and gets through a Scope against plain SQLite.

Run it as ``.venv/bin/python bench/store.py`` (``--help`` for options). It
measures, in one run and on the same disk:

- durable puts/s with 1 and with 64 concurrent writers through
  ``Scope.kv_put`` (acknowledged only once committed with synchronous=FULL),
  and the same workload against a plain SQLite table (one row per key, WAL,
  synchronous=FULL, every put committed on its own);
- gets/s through ``scope.kv.get`` against ``SELECT`` on the plain table;
- compaction: 1,000 keys each overwritten 100 times, then the stored CRDT
  bytes and the database file size against the live content.

The workload: writer ``w`` of ``W`` issues puts number ``w, w+W, w+2W, ...``
and put ``j`` writes key ``bench/<j mod 1000>`` with a fresh ~100-byte value,
so the first pass creates the keys and the rest overwrite them, and no two
writers touch one key at the same time.

For 64 plain-SQLite writers the peer is 64 threads, each with its own
connection, in two variants: contending through SQLite's busy handler
(``busy_timeout``), and queuing on one Python lock before ``BEGIN IMMEDIATE``
(what an ideal busy handler would do). The faster of the two is the peer.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

from konsul.sync.replica import Replica

KEYS = 1000
VALUE_BYTES = 100


def key_of(j: int) -> str:
    return f"bench/{j % KEYS:04d}"


def value_of(j: int) -> bytes:
    return f"{j:010d}".encode().ljust(VALUE_BYTES, b".")


# -- Konsul ------------------------------------------------------------------------


async def _konsul_puts(data_dir: Path, writers: int, total: int) -> tuple[float, float]:
    replica = Replica.open(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("bench")

            async def writer(w: int) -> None:
                for j in range(w, total, writers):
                    await scope.kv_put(key_of(j), value_of(j))

            started, cpu = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as writers_nursery:
                for w in range(writers):
                    writers_nursery.start_soon(writer, w)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            nursery.cancel_scope.cancel()
    finally:
        replica.close()
    return total / elapsed, cpu / total * 1e6


def konsul_puts(data_dir: Path, writers: int, total: int) -> tuple[float, float]:
    """Puts per second, and CPU microseconds (all threads) per put."""
    return trio.run(_konsul_puts, data_dir, writers, total)


async def _konsul_gets(data_dir: Path, total: int) -> float:
    replica = Replica.open(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("bench")
            for j in range(KEYS):
                await scope.kv_put(key_of(j), value_of(j))
            get = scope.kv.get
            keys = [key_of(j) for j in range(total)]
            started = time.perf_counter()
            for key in keys:
                if get(key) is None:
                    raise AssertionError(f"{key} is missing")
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    finally:
        replica.close()
    return total / elapsed


def konsul_gets(data_dir: Path, total: int) -> float:
    return trio.run(_konsul_gets, data_dir, total)


# -- plain SQLite ------------------------------------------------------------------


def _plain_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    return conn


_PUT = "INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)"


def plain_puts(data_dir: Path, writers: int, total: int, serialise: bool) -> tuple[float, float]:
    """Every put is its own transaction; each writer thread has its own connection."""
    path = data_dir / "plain.db"
    conns = [_plain_connect(path) for _ in range(writers)]
    lock = threading.Lock() if serialise else None
    errors: list[BaseException] = []
    start = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        conn = conns[w]
        start.wait()
        try:
            for j in range(w, total, writers):
                if lock is None:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(_PUT, (key_of(j), value_of(j)))
                    conn.execute("COMMIT")
                else:
                    with lock:
                        conn.execute("BEGIN IMMEDIATE")
                        conn.execute(_PUT, (key_of(j), value_of(j)))
                        conn.execute("COMMIT")
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    start.wait()
    started, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return total / elapsed, cpu / total * 1e6


def plain_gets(data_dir: Path, total: int) -> float:
    conn = _plain_connect(data_dir / "plain.db")
    with conn:
        conn.executemany(_PUT, [(key_of(j), value_of(j)) for j in range(KEYS)])
    keys = [key_of(j) for j in range(total)]
    started = time.perf_counter()
    for key in keys:
        if conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone() is None:
            raise AssertionError(f"{key} is missing")
    elapsed = time.perf_counter() - started
    conn.close()
    return total / elapsed


# -- compaction ----------------------------------------------------------------------


async def _compaction(data_dir: Path, rounds: int, writers: int) -> dict[str, int]:
    replica = Replica.open(data_dir)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("bench")
            total = KEYS * rounds

            async def writer(w: int) -> None:
                for j in range(w, total, writers):
                    await scope.kv_put(key_of(j), value_of(j))

            async with trio.open_nursery() as writers_nursery:
                for w in range(writers):
                    writers_nursery.start_soon(writer, w)
            result = {
                "live": scope.kv.live_bytes(),
                "stored": scope.stored_bytes(),
                "file": replica.store.size_bytes(),
                "compactions": scope.compactions,
            }
            nursery.cancel_scope.cancel()
        # The committer is stopped: nothing else uses the connection now.
        replica.store.checkpoint()
        result["file_checkpointed"] = replica.store.size_bytes()
    finally:
        replica.close()
    return result


def compaction(data_dir: Path, rounds: int, writers: int) -> dict[str, int]:
    return trio.run(_compaction, data_dir, rounds, writers)


# -- report -------------------------------------------------------------------------


def machine() -> str:
    disk = subprocess.run(
        ["df", "-h", "--output=source,fstype,size", "."], capture_output=True, text=True
    ).stdout.split("\n")[1]
    return (
        f"nproc {os.cpu_count()}, python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"disk: {' '.join(disk.split())}"
    )


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="parent of the data dirs (default: system temp)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every operation count")
    parser.add_argument("--reps", type=int, default=3, help="trials per put figure (median reported)")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep CPython's garbage collector settings (the agent tunes them)")
    args = parser.parse_args()
    if not args.default_gc:
        # As `konsul edge` and `konsul hub` run (cli/run.py): a young
        # generation of 10,000 objects, and the start-up heap frozen.
        from konsul.cli.run import collect_garbage_less_often

        collect_garbage_less_often()

    def n(count: int) -> int:
        return max(64, int(count * args.scale))

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="konsul-bench-") as tmp:
        root = Path(tmp)
        os.chdir(root)
        print(f"machine: {machine()}; data dirs under {root}; {load()}")
        counter = iter(range(10_000))

        def fresh() -> Path:
            path = root / f"run{next(counter)}"
            path.mkdir()
            return path

        # Konsul and SQLite trials alternate, so that a burst of load from
        # elsewhere on the machine hits both; each figure is the median.
        trials: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.reps):
            for name, run in (
                ("k1", lambda: konsul_puts(fresh(), 1, n(1500))),
                ("p1", lambda: plain_puts(fresh(), 1, n(1500), serialise=False)),
                ("k64", lambda: konsul_puts(fresh(), 64, n(15000))),
                ("p64_busy", lambda: plain_puts(fresh(), 64, n(1500), serialise=False)),
                ("p64_lock", lambda: plain_puts(fresh(), 64, n(1500), serialise=True)),
            ):
                trials.setdefault(name, []).append(run())

        def rate(name: str) -> float:
            return statistics.median(t[0] for t in trials[name])

        def cpu(name: str) -> float:
            return statistics.median(t[1] for t in trials[name])

        def row(label: str, konsul: str, plain: str, note: str) -> None:
            k, p = rate(konsul), rate(plain)
            print(
                f"{label:<18} {k:>11,.0f} {p:>11,.0f} {k / p:>7.2f}x  {note:<15}"
                f"CPU/put {cpu(konsul):,.0f} vs {cpu(plain):,.0f} us"
            )
            for name in (konsul, plain):
                print(f"{'':<18} {name:>11} trials: " + ", ".join(f"{t[0]:,.0f}" for t in trials[name]))
            # Trials of one repetition ran one after the other, so they saw
            # about the same load: their ratios are steadier than the medians'.
            pairs = sorted(a[0] / b[0] for a, b in zip(trials[konsul], trials[plain]))
            print(
                f"{'':<18} {'':>11} ratio per repetition: median {statistics.median(pairs):.2f}x "
                f"(" + ", ".join(f"{r:.2f}" for r in pairs) + ")"
            )

        print(f"\n{'':<18} {'konsul/s':>11} {'sqlite/s':>11} {'ratio':>8}   (medians of {args.reps} trials)")
        row("puts, 1 writer", "k1", "p1", "(goal >= 0.5x)")
        faster = "p64_busy" if rate("p64_busy") > rate("p64_lock") else "p64_lock"
        row("puts, 64 writers", "k64", faster, "(goal >= 5x)")
        print(
            f"  sqlite peer for 64 writers: 64 threads, each with its own connection, one "
            f"transaction per put; contending through busy_timeout {rate('p64_busy'):,.0f}/s, "
            f"queued on a lock {rate('p64_lock'):,.0f}/s; the ratio uses the faster"
        )
        kg, pg = konsul_gets(fresh(), n(200_000)), plain_gets(fresh(), n(200_000))
        print(f"{'gets, 1 reader':<18} {kg:>11,.0f} {pg:>11,.0f} {kg / pg:>7.2f}x")

        rounds = max(2, int(100 * args.scale))
        started = time.perf_counter()
        c = compaction(fresh(), rounds, 64)
        elapsed = time.perf_counter() - started
        live = c["live"]
        print(
            f"\ncompaction: {KEYS} keys x {rounds} overwrites (~{VALUE_BYTES}-byte values, 64 writers, "
            f"{KEYS * rounds / elapsed:,.0f} puts/s), {c['compactions']} compactions"
        )
        print(f"  live content (keys+values)  {live:>10,} B")
        print(f"  stored CRDT bytes           {c['stored']:>10,} B  {c['stored'] / live:>6.2f}x live (goal <= 3x)")
        print(f"  db + wal file               {c['file']:>10,} B  {c['file'] / live:>6.2f}x live")
        print(
            f"  db + wal after checkpoint   {c['file_checkpointed']:>10,} B  "
            f"{c['file_checkpointed'] / live:>6.2f}x live"
        )
        print(f"\n{load()}")


if __name__ == "__main__":
    main()

"""Diagnosis: WAL pages and time per commit round of ``bench/store.py``'s puts.

Run it as ``.venv/bin/python bench/store_pages.py`` (``--help`` for options).
It runs the store benchmark's put workload (1 and 64 writers) with checkpoints
switched off, so the WAL only grows, and reports per commit round the puts it
held, the WAL pages it wrote (growth of the ``-wal`` file over page size + 24)
and the time of the writer thread's transaction. The first quarter of the
rounds (while the keys are being created) is left out.

Page counts do not depend on the load of the machine the way rates do, so they
compare two versions of the code well: run it with ``PYTHONPATH`` pointing at
a directory that holds another checkout's ``sync/`` as ``konsul/sync``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import store as bench  # noqa: E402  (bench/store.py)

from konsul.sync import store as store_module  # noqa: E402


def instrument() -> list[tuple[int, float, float]]:
    """Switch checkpoints off and record (puts, WAL pages, seconds) per round."""
    rounds: list[tuple[int, float, float]] = []
    store_module.Store.checkpoint = lambda self: None
    checkpointer = getattr(store_module, "_Checkpointer", None)
    if checkpointer is not None:
        checkpointer.request = lambda self: None
    original_open = store_module.Store.open.__func__

    def open_(cls, *args, **kwargs):
        store = original_open(cls, *args, **kwargs)
        store._conn.execute("PRAGMA wal_autocheckpoint = 0")
        return store

    store_module.Store.open = classmethod(open_)
    original_write = store_module.Store._write

    def write(self, batches):
        wal = f"{self.path}-wal"
        before = os.path.getsize(wal) if os.path.exists(wal) else 32
        started = time.perf_counter()
        original_write(self, batches)
        elapsed = time.perf_counter() - started
        [(page_size,)] = self._conn.execute("PRAGMA page_size").fetchall()
        pages = (os.path.getsize(wal) - before) / (page_size + 24)
        # Puts in the round: one index change each (a delete or an expiry adds one too).
        rounds.append((sum(len(index) for b in batches for index, _ in b.side.values()), pages, elapsed))

    store_module.Store._write = write
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="parent of the data dirs (default: system temp)")
    args = parser.parse_args()
    rounds = instrument()
    print(f"machine: {bench.machine()}; {bench.load()}; code: {store_module.__file__}")
    for writers, total in ((1, 1500), (64, 15000)):
        rounds.clear()
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="konsul-pages-") as tmp:
            rate, _ = bench.konsul_puts(Path(tmp), writers, total)
        kept = rounds[len(rounds) // 4 :]
        puts = sum(r[0] for r in kept)
        pages = [r[1] for r in kept]
        print(
            f"{writers:>2} writer(s): {len(rounds)} rounds, {puts / len(kept):.1f} puts/round, "
            f"WAL pages/round mean {statistics.mean(pages):.2f} median {statistics.median(pages):.0f}, "
            f"pages/put {sum(pages) / puts:.3f}, transaction median "
            f"{statistics.median(r[2] for r in kept) * 1e3:.2f} ms ({rate:,.0f} puts/s)"
        )
    print(bench.load())


if __name__ == "__main__":
    main()

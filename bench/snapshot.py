"""What a snapshot costs on a live edge, against the sqlite3 shell's ``.backup`` of the same store.

    .venv/bin/python bench/snapshot.py [KEYS]

Starts ``konsul edge`` (ACLs off) on a temporary directory, writes KEYS keys
(default 20,000, 100-byte values) through /v1/txn, then measures:

- ``GET /v1/snapshot`` end to end (copy, count, archive, download), while a
  writer thread keeps writing one key per request;
- the peer: ``sqlite3 konsul.db ".backup copy.db"`` on the same live store
  (only the copy: no checksums, counts or archive);
- the writer's PUT latency (median and worst) while no snapshot runs and
  while snapshots run back to back.

Prints the figures and the ratio of the two copy times.
"""

from __future__ import annotations

import base64
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agents import EdgeProcess  # noqa: E402


def fill(client: httpx.Client, keys: int) -> None:
    value = base64.b64encode(b"v" * 100).decode()
    for start in range(0, keys, 64):
        ops = [{"KV": {"Verb": "set", "Key": f"bench/{n:07d}", "Value": value}} for n in range(start, min(keys, start + 64))]
        assert client.put("/v1/txn", json=ops).status_code == 200


def write_latencies(url: str, stop: threading.Event, into: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        number = 0
        while not stop.is_set():
            started = time.perf_counter()
            assert client.put(f"/v1/kv/load/{number % 1000}", content=b"x").json() is True
            into.append(time.perf_counter() - started)
            number += 1


def during(url: str, action, rounds: int) -> tuple[list[float], list[float]]:
    latencies: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=write_latencies, args=(url, stop, latencies))
    writer.start()
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
    finally:
        stop.set()
        writer.join()
    return times, latencies


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as work:
        edge = EdgeProcess(Path(work) / "edge")
        try:
            with httpx.Client(base_url=edge.url, timeout=60) as client:
                fill(client, keys)
                idle, quiet = during(edge.url, lambda: time.sleep(0.2), 10)

                archive_bytes: list[int] = []

                def snapshot() -> None:
                    archive_bytes.append(len(client.get("/v1/snapshot").content))

                ours, loaded = during(edge.url, snapshot, 5)

            copy = Path(work) / "copy.db"

            def shell_backup() -> None:
                copy.unlink(missing_ok=True)
                subprocess.run(["sqlite3", str(Path(work) / "edge" / "konsul.db"), f".backup {copy}"], check=True)

            peer, _ = during(edge.url, shell_backup, 5)
            size = copy.stat().st_size
        finally:
            edge.stop()
    print(f"{keys} keys, store {size / 1e6:.1f} MB, snapshot {archive_bytes[-1] / 1e6:.1f} MB")
    print(f"GET /v1/snapshot under writes: median {ms(statistics.median(ours))}, worst {ms(max(ours))}")
    print(f"sqlite3 .backup under writes:  median {ms(statistics.median(peer))}, worst {ms(max(peer))}")
    print(f"ratio (ours / sqlite3 shell): {statistics.median(ours) / statistics.median(peer):.1f}")
    print(f"PUT latency, no snapshot:  median {ms(statistics.median(quiet))}, worst {ms(max(quiet))} ({len(quiet)} writes)")
    print(f"PUT latency, snapshotting: median {ms(statistics.median(loaded))}, worst {ms(max(loaded))} ({len(loaded)} writes)")


if __name__ == "__main__":
    main()

"""PUT /v1/snapshot streams uploads larger than the API's 1 MiB body bound, up to --snapshot-max-bytes (curl)."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import httpx

from agents import EdgeProcess, eventually

BIG_KEYS = 24
BIG_VALUE = 384 * 1024  # random, so the archive stays about as large as the store: ~9 MiB


def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; (HTTP status, body)."""
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status or 0), body


def test_a_snapshot_of_several_megabytes_saved_under_load_restores_over_http(tmp_path):
    values = {f"big/{n:02d}": os.urandom(BIG_VALUE) for n in range(BIG_KEYS)}
    acknowledged: list[str] = []
    stop = threading.Event()
    source = EdgeProcess(tmp_path / "source")

    def writer() -> None:
        with httpx.Client(base_url=source.url, timeout=10) as client:
            number = 0
            while not stop.is_set():
                key = f"load/{number:06d}"
                if client.put(f"/v1/kv/{key}", content=key.encode()).json() is True:
                    acknowledged.append(key)
                number += 1

    thread = threading.Thread(target=writer)
    snap = tmp_path / "big.snap"
    try:
        with httpx.Client(base_url=source.url, timeout=10) as client:
            for key, value in values.items():
                assert client.put(f"/v1/kv/{key}", content=value).json() is True
        thread.start()
        eventually(lambda: len(acknowledged) >= 50, what="the writer under way")
        before = list(acknowledged)
        status, _ = curl("-o", str(snap), f"{source.url}/v1/snapshot")
        assert status == 200
        stop.set()
        thread.join()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        source.stop()
    assert snap.stat().st_size > 8 * 1024 * 1024  # well past the API's 1 MiB body bound

    # Refused past --snapshot-max-bytes, whether the size is declared or not; nothing is staged.
    small = EdgeProcess(tmp_path / "small", extra=["--snapshot-max-bytes", "1000000"])
    try:
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            status, body = curl("-X", "PUT", "-T", str(snap), *extra, f"{small.url}/v1/snapshot")
            assert status == 413, body
            refusal = json.loads(body)
            assert refusal["error"] == "too_large" and "--snapshot-max-bytes" in refusal["detail"]
        assert not (small.data_dir / "restore-pending.tar.gz").exists()
        assert not [p for p in small.data_dir.iterdir() if p.name.startswith(".restore-")]
        with httpx.Client(base_url=small.url, timeout=10) as client:
            assert client.put("/v1/kv/still", content=b"here").json() is True
    finally:
        small.stop()

    fresh = EdgeProcess(tmp_path / "fresh")
    try:
        status, body = curl("-X", "PUT", "-T", str(snap), f"{fresh.url}/v1/snapshot")
        assert status == 200, body
        assert json.loads(body)["Staged"] is True
    finally:
        fresh.stop()
    fresh = EdgeProcess(tmp_path / "fresh")
    try:
        with httpx.Client(base_url=fresh.url, timeout=10) as client:
            for key, value in values.items():
                assert client.get(f"/v1/kv/{key}", params={"raw": "true"}).content == value
            keys = set(client.get("/v1/kv/load/", params={"keys": "true"}).json())
            assert set(before) <= keys
    finally:
        fresh.stop()

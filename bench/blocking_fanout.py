"""Blocking-query fan-out: N watchers of one key woken by one write, ``konsul edge`` against etcd.

Run it on a Debian machine (it installs ``etcd-server`` with apt-get if missing,
as root)::

    .venv/bin/python bench/blocking_fanout.py                 # 5,000 watchers, 3 rounds
    .venv/bin/python bench/blocking_fanout.py --watchers 1000 --rounds 5

What it does, in one run, everything on 127.0.0.1 and on free ports:

1. Starts ``konsul edge`` (fresh data dir, ACLs off, durability "full", its
   HTTP connection limits raised to hold the watchers:
   ``--http-max-connections`` and ``--http-max-connections-per-source``).
   Opens N HTTP connections, each a Consul watcher: ``GET /v1/kv/fan/key?index=I&wait=60s``
   with the key's current index, so each blocks until the key changes.
2. Once every watcher is parked (all connections held, then the server's CPU
   quiet for a moment), one client writes the key (``PUT /v1/kv/fan/key``) and
   the clock runs from just before that write is sent until the last watcher
   has its whole answer (status 200 and the new value). Each watcher then asks
   again with the new index, as a watch loop does, and the next round starts
   once they are all parked again.
3. Does the same against a single-node etcd (Debian's ``etcd-server``, default
   settings) through its HTTP API: each watcher is an HTTP connection holding
   a v3 watch stream (``POST /v3/watch`` on the JSON gateway), parked once
   etcd has confirmed the watch ("created"); the write is ``POST /v3/kv/put``
   and a watcher is done when its stream delivers the event.
4. Prints, per target and round, the time to the first, median, 99th
   percentile and last answer, the server's CPU seconds for the round, and the
   ratio konsul/etcd of the time to the last answer (median over rounds).

One Python process (trio) plays every watcher; it competes with the server
for the machine's cores, equally for both targets. The times include it.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_kv import KONSUL, LIVE, Server, free_port, http_request, log, start_etcd  # noqa: E402

KEY = "fan/key"


def ensure_etcd() -> None:
    if shutil.which("etcd") is not None:
        return
    if os.geteuid() != 0:
        sys.exit("missing etcd: run as root, or apt-get install -y etcd-server")
    log("installing etcd-server with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")  # do not let the package start a system-wide etcd
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "etcd-server"], check=True, env=env)
    finally:
        if made:
            policy.unlink(missing_ok=True)


def start_konsul(data_dir: Path, logs: Path, watchers: int) -> Server:
    port = free_port()
    limit = str(watchers + 64)
    argv = [str(KONSUL), "edge", "--site", "s1", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{port}",
            "--mqtt-addr", "", "--coap-addr", "", "--dns-addr", "", "--acl", "off",
            "--http-max-connections", limit, "--http-max-connections-per-source", limit]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(logs.parent / "pycache")
    return Server("konsul edge", argv, logs / f"konsul-{port}.log", port, "/health/ready", env)


def wait_cpu_quiet(server: Server, window: float = 0.5, share: float = 0.05, timeout: float = 120.0) -> None:
    """Until the server used under ``share`` of a core over ``window`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.cpu_seconds()
        time.sleep(window)
        if server.cpu_seconds() - before < share * window:
            return
    raise RuntimeError(f"{server.name} never went quiet")


# -- the watchers ------------------------------------------------------------------------


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes, int]:
    """One HTTP/1.1 response with a Content-Length from ``stream``: status, body, X-Consul-Index.

    Leftovers stay in ``buffer``.
    """
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    start = len(head) + 4
    length = index = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-consul-index":
            index = int(value)
    while len(buffer) < start + length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buffer += chunk
    body = bytes(buffer[start:start + length])
    del buffer[:start + length]
    return int(head.split(b" ", 2)[1]), body, index


class Round:
    def __init__(self, watchers: int) -> None:
        self.parked = 0
        self.all_parked = trio.Event()
        self.done: list[float] = []
        self.all_done = trio.Event()
        self.watchers = watchers
        self.errors: list[str] = []

    def park(self) -> None:
        self.parked += 1
        if self.parked == self.watchers:
            self.all_parked.set()

    def finish(self, ok: bool, what: str = "") -> None:
        self.done.append(time.perf_counter())
        if not ok:
            self.errors.append(what)
        if len(self.done) == self.watchers:
            self.all_done.set()


async def konsul_watcher(port: int, index: int, rounds: list[Round], values: list[bytes],
                         opening: trio.CapacityLimiter) -> None:
    async with opening:  # connect in waves, not thousands of SYNs at once
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = bytearray()
    async with stream:
        for number, round_ in enumerate(rounds):
            request = f"GET /v1/kv/{KEY}?index={index}&wait=60s HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
            await stream.send_all(request)
            round_.park()  # sent: the server parks it once read (the CPU-quiet wait covers that)
            status, body, new_index = await read_response(stream, buffer)
            # A byte search, as the etcd watchers do: the client's work per answer is alike.
            ok = status == 200 and b'"Value":"%s"' % base64.b64encode(values[number]) in body
            round_.finish(ok, f"{status} {body[:80]!r}")
            index = new_index or index  # the next blocking query waits past it, as a Consul watch does


async def etcd_watcher(port: int, rounds: list[Round], opening: trio.CapacityLimiter) -> None:
    async with opening:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    body = json.dumps({"create_request": {"key": base64.b64encode(KEY.encode()).decode()}}).encode()
    request = (b"POST /v3/watch HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    async with stream:
        await stream.send_all(request)
        seen = bytearray()
        parked = False
        number = 0
        while number < len(rounds):
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("etcd closed a watch stream")
            seen += chunk
            if not parked and b'"created":true' in seen:
                parked = True
                for round_ in rounds:
                    round_.park()  # a v3 watch stays registered across rounds
            while number < len(rounds) and seen.count(b'"events"') > number:
                rounds[number].finish(True)
                number += 1


async def run_rounds(target: str, server: Server, watchers: int, rounds: int, values: list[bytes],
                     connect_limit: int = 256) -> list[dict]:
    port = server.port
    plan = [Round(watchers) for _ in range(rounds)]
    results = []
    if target == "konsul":
        http_request(port, "PUT", f"/v1/kv/{KEY}", b"start")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/v1/kv/{KEY}")
        response = conn.getresponse()
        response.read()
        index = int(response.headers["X-Consul-Index"])
        conn.close()
    else:
        http_request(port, "POST", "/v3/kv/put", json.dumps(
            {"key": base64.b64encode(KEY.encode()).decode(), "value": base64.b64encode(b"start").decode()}).encode())
    opening = trio.CapacityLimiter(connect_limit)
    async with trio.open_nursery() as nursery:
        for _ in range(watchers):
            if target == "konsul":
                nursery.start_soon(konsul_watcher, port, index, plan, values, opening)
            else:
                nursery.start_soon(etcd_watcher, port, plan, opening)
        for number, round_ in enumerate(plan):
            with trio.fail_after(300):
                await round_.all_parked.wait()
            await trio.to_thread.run_sync(wait_cpu_quiet, server)
            cpu_before = server.cpu_seconds()
            started = time.perf_counter()
            if target == "konsul":
                await trio.to_thread.run_sync(http_request, port, "PUT", f"/v1/kv/{KEY}", values[number])
            else:
                body = json.dumps({"key": base64.b64encode(KEY.encode()).decode(),
                                   "value": base64.b64encode(values[number]).decode()}).encode()
                await trio.to_thread.run_sync(http_request, port, "POST", "/v3/kv/put", body)
            with trio.fail_after(300):
                await round_.all_done.wait()
            times = sorted(t - started for t in round_.done)
            results.append({
                "target": target, "round": number + 1, "watchers": watchers,
                "first_s": times[0], "median_s": statistics.median(times),
                "p99_s": times[int(len(times) * 0.99) - 1], "last_s": times[-1],
                "server_cpu_s": server.cpu_seconds() - cpu_before, "errors": len(round_.errors),
            })
            log(f"{target} round {number + 1}: last answer after {times[-1] * 1000:.0f} ms "
                f"(median {results[-1]['median_s'] * 1000:.0f} ms, {len(round_.errors)} errors)")
        nursery.cancel_scope.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="konsul,etcd", help="comma-separated: konsul, etcd")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if "etcd" in targets:
        ensure_etcd()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.watchers + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    values = [f"round-{n}-{'x' * 80}".encode() for n in range(args.rounds)]
    root = Path(tempfile.mkdtemp(prefix="konsul-fanout-"))
    logs = root / "logs"
    logs.mkdir()
    results: list[dict] = []
    try:
        for target in targets:
            data = root / f"{target}-data"
            server = start_konsul(data, logs, args.watchers) if target == "konsul" else start_etcd(data, logs)
            try:
                server.wait_ready()
                results += trio.run(run_rounds, target, server, args.watchers, args.rounds, values)
            finally:
                server.stop()
    finally:
        for server in list(LIVE):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.watchers} watchers of one key, one write, {args.rounds} rounds; times from the write\n")
    print("| target | round | first | median | p99 | last | server CPU | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['target']} | {r['round']} | {r['first_s'] * 1000:.0f} ms | {r['median_s'] * 1000:.0f} ms | "
              f"{r['p99_s'] * 1000:.0f} ms | {r['last_s'] * 1000:.0f} ms | {r['server_cpu_s']:.2f} s | {r['errors']} |")
    last = {t: statistics.median(r["last_s"] for r in results if r["target"] == t) for t in targets}
    if "konsul" in last and "etcd" in last:
        print(f"\ntime to the last answer (median of rounds): konsul {last['konsul'] * 1000:.0f} ms, "
              f"etcd {last['etcd'] * 1000:.0f} ms, konsul/etcd {last['konsul'] / last['etcd']:.2f}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())

"""CoAP benchmark: ``konsul edge`` against a bare aiocoap server and libcoap's coap-server.

Run it on a Debian machine with libcoap3-bin installed (scripts/setup does)::

    .venv/bin/python bench/coap.py                  # --help for options

In one run, everything on 127.0.0.1 and on free ports, it measures GET and
PUT requests/s against:

1. libcoap's ``coap-server`` (C, ``/example_data``, kept in memory) -- first,
   so the load generator's own ceiling is visible: if it drives libcoap far
   faster than the Python servers, it is not what limits them;
2. a bare aiocoap server (plain asyncio, one resource holding a value in
   memory, UDP transport only) -- the goal is at least 0.8x of it;
3. ``konsul edge`` (``/kv/bench/value`` authenticated with ``ep``/``tk``, so
   every request is checked like a device's; PUT is durable, SQLite
   ``synchronous=FULL`` with group commit) and the same with
   ``--durability relaxed``.

The load generator is in this file: raw UDP sockets, one per client
endpoint, pre-encoded confirmable requests, each endpoint with one request in
flight (CoAP's NSTART=1) and its own message-id sequence. Many endpoints run
in parallel because one endpoint is limited to one request per round trip
and, at high rates, by message-id reuse (a server answers a reused id from
its deduplication cache for EXCHANGE_LIFETIME, 247 s). A request unanswered
for two seconds is counted as a timeout and replaced. It prints req/s, the
share of bad answers, and the server's CPU use (100% = one core).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GET, PUT = 1, 3
MANAGEMENT_TOKEN = "5b1f2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
OK_CODES = {GET: {0x45}, PUT: {0x44, 0x41}}  # 2.05 Content; 2.04 Changed, 2.01 Created


# -- the load generator ------------------------------------------------------------------


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """CoAP options (RFC 7252 3.1), sorted by number, delta-encoded."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, (n - 269).to_bytes(2, "big")

    out, last = bytearray(), 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta, delta_ext = nibble(number - last)
        length, length_ext = nibble(len(value))
        out += bytes([(delta << 4) | length]) + delta_ext + length_ext + value
        last = number
    return bytes(out)


def request_tail(path: str, query: str, payload: bytes, content_format: int | None) -> bytes:
    """Everything of a request after its token: options and payload."""
    options = [(11, segment.encode()) for segment in path.strip("/").split("/")]
    options += [(15, item.encode()) for item in query.split("&") if item]
    if content_format is not None:
        options.append((12, bytes([content_format]) if content_format else b""))
    return encode_options(options) + (b"\xff" + payload if payload else b"")


@dataclass
class LoadResult:
    ok: int = 0
    bad: int = 0
    timeouts: int = 0
    separate: int = 0  # answered with an empty ACK first, the response later
    seconds: float = 0.0
    bad_codes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def drive(host: str, port: int, code: int, tail: bytes, endpoints: int, seconds: float) -> LoadResult:
    """Closed-loop load: each endpoint sends its next request when the last is answered.

    A slow answer may come as an empty ACK and then a separate confirmable
    response (RFC 7252 5.2.2); that is matched by token and acknowledged.
    """
    selector = selectors.DefaultSelector()
    state = []  # per endpoint: [socket, message id, sent at, token]
    for index in range(endpoints):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((host, port))
        entry = [sock, (index * 7919) & 0xFFFF, 0.0, b""]
        selector.register(sock, selectors.EVENT_READ, entry)
        state.append(entry)
    head = bytes([0x44, code])  # version 1, CON, token length 4
    ok_codes = OK_CODES[code]
    result = LoadResult()
    counter = 0

    def send(entry) -> None:
        nonlocal counter
        entry[1] = (entry[1] + 1) & 0xFFFF
        counter += 1
        entry[2] = time.monotonic()
        entry[3] = counter.to_bytes(4, "big")
        entry[0].send(head + entry[1].to_bytes(2, "big") + entry[3] + tail)

    for entry in state:
        send(entry)
    start = time.monotonic()
    deadline = start + seconds
    next_check = start + 0.25
    while True:
        for key, _ in selector.select(0.1):
            entry = key.data
            sock = entry[0]
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                if len(data) < 4:
                    continue
                if data[1] == 0:
                    result.separate += 1  # an empty ACK: the response follows separately
                    continue
                if data[4:8] != entry[3]:
                    continue  # a late answer to a request already given up on
                if data[0] & 0x30 == 0:  # a separate CON response: acknowledge it
                    sock.send(bytes([0x60, 0]) + data[2:4])
                if data[1] in ok_codes:
                    result.ok += 1
                else:
                    result.bad += 1
                    result.bad_codes[f"{data[1] >> 5}.{data[1] & 31:02d}"] += 1
                send(entry)
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_check:
            next_check = now + 0.25
            for entry in state:
                if now - entry[2] > 2.0:
                    result.timeouts += 1
                    send(entry)
    result.seconds = time.monotonic() - start
    for entry in state:
        selector.unregister(entry[0])
        entry[0].close()
    return result


# -- the servers ---------------------------------------------------------------------------


def bare_aiocoap_server(port: int, under_trio: bool = False, batched: bool = False) -> None:
    """The reference: aiocoap with one in-memory resource, on plain asyncio or under trio-asyncio.

    The trio-asyncio variant is hosted as konsul hosts aiocoap (one
    ``trio_asyncio.open_loop()``, the context created through ``aio_as_trio``)
    and shows what the boundary itself costs.
    """
    import asyncio

    import aiocoap
    from aiocoap import resource

    class Value(resource.Resource):
        def __init__(self) -> None:
            super().__init__()
            self.value = b"hello"

        async def render_get(self, request):
            return aiocoap.Message(payload=self.value, content_format=0)

        async def render_put(self, request):
            self.value = request.payload
            return aiocoap.Message(code=aiocoap.CHANGED)

    site = resource.Site()
    site.add_resource(["value"], Value())
    os.environ.setdefault("AIOCOAP_REUSE_PORT", "0")

    async def main() -> None:
        await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
        print("ready", flush=True)
        await asyncio.get_running_loop().create_future()

    if not under_trio:
        asyncio.run(main())
        return
    import trio
    import trio_asyncio

    async def trio_main() -> None:
        async with trio_asyncio.open_loop() as loop:
            if batched:
                from konsul.protocols.aio_loop import run_callbacks_in_batches

                run_callbacks_in_batches(loop)
            await trio_asyncio.aio_as_trio(aiocoap.Context.create_server_context)(
                site, bind=("127.0.0.1", port), transports=["udp6"]
            )
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(trio_main)


def wait_for_coap(port: int, path: str, timeout: float = 30.0) -> None:
    """Return once the server on ``port`` answers a GET (coap-server prints nothing when ready)."""
    request = bytes([0x40, GET, 0, 1]) + request_tail(path, "", b"", None)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.2)
        while True:
            try:
                sock.send(request)
                sock.recv(2048)
                return
            except OSError:  # a timeout, or "connection refused" before the bind
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing answers CoAP on port {port}") from None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 - open as long as the server runs; closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while not (found := re.search(ready, log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        self.match = found

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def http(url: str, method: str, path: str, body: bytes) -> bytes:
    import httpx

    reply = httpx.request(method, url + path, content=body, headers={"X-Consul-Token": MANAGEMENT_TOKEN})
    reply.raise_for_status()
    return reply.content


def cli_module(python: str) -> str:
    """The module that runs the `konsul` command under ``python``: checkouts before cli/ had it in edge/."""
    found = subprocess.run(
        [python, "-c", "import importlib.util; print(importlib.util.find_spec('konsul.cli') is not None)"],
        capture_output=True, text=True,
    )
    return "konsul.cli" if found.stdout.strip() == "True" else "konsul.edge.cli"


def start_edge(work: Path, durability: str, python: str = sys.executable, label: str = "") -> tuple[Server, int, str]:
    data = work / f"edge-{durability}{label}"
    server = Server(
        [
            python, "-m", cli_module(python), "edge", "--acl", "off",
            "--site", "bench", "--data-dir", str(data), "--http-addr", "127.0.0.1:0",
            "--mqtt-addr", "", "--coap-addr", "127.0.0.1:0", "--durability", durability,
            "--acl-initial-management", MANAGEMENT_TOKEN,  # ACLs on (the default); this token creates the device
        ],
        work / f"edge-{durability}{label}.log",
        r"http listening on (http://\S+)",
        # The device authenticates with tk= (off by default since OSCORE); by
        # environment, which a baseline without the flag ignores.
        env={"KONSUL_COAP_URI_TOKENS": "on"},
    )
    url = server.match.group(1)
    port = int(re.search(r"coap listening on \S+:(\d+)", server.log_path.read_text()).group(1))
    import json

    token = json.loads(http(url, "PUT", "/v1/devices/bench", b'{"KVWrite": ["bench/"]}'))["Token"]
    http(url, "PUT", "/v1/kv/bench/value", b"hello")
    return server, port, f"ep=bench&tk={token}"


# -- the run --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    server: Server
    port: int
    path: str
    query: str


def measure(target: Target, code: int, args) -> tuple[LoadResult, float]:
    """One measured case; returns the load result and the server's CPU use (1.0 = one core)."""
    payload = b"v" * args.value_size if code == PUT else b""
    tail = request_tail(target.path, target.query, payload, 0 if code == PUT else None)
    drive("127.0.0.1", target.port, code, tail, args.endpoints, args.warmup)
    cpu = target.server.cpu_seconds()
    result = drive("127.0.0.1", target.port, code, tail, args.endpoints, args.seconds)
    return result, (target.server.cpu_seconds() - cpu) / result.seconds


TARGETS = ("libcoap", "bare", "trio", "batched", "full", "relaxed")


def start_targets(work: Path, libcoap: str, wanted: list[str], baseline: str | None = None) -> list[Target]:
    targets = []
    if "libcoap" in wanted:
        port = free_udp_port()
        server = Server([libcoap, "-A", "127.0.0.1", "-p", str(port), "-v", "0"], work / "libcoap.log", "")
        targets.append(Target("libcoap coap-server", server, port, "example_data", ""))
        wait_for_coap(port, "example_data")
    port = free_udp_port()  # the reference every ratio is taken against: always measured
    server = Server([sys.executable, __file__, "--bare-server", str(port)], work / "bare.log", "ready")
    targets.append(Target("bare aiocoap", server, port, "value", ""))
    if "trio" in wanted:
        port = free_udp_port()
        argv = [sys.executable, __file__, "--bare-server", str(port), "--under-trio"]
        server = Server(argv, work / "trio.log", "ready")
        targets.append(Target("bare aiocoap/trio-aio", server, port, "value", ""))
    if "batched" in wanted:
        port = free_udp_port()
        argv = [sys.executable, __file__, "--bare-server", str(port), "--under-trio", "--batched"]
        server = Server(argv, work / "batched.log", "ready")
        targets.append(Target("bare aiocoap/batched", server, port, "value", ""))
    for durability in ("full", "relaxed"):
        if durability in wanted:
            server, port, query = start_edge(work, durability)
            targets.append(Target(f"konsul edge ({durability})", server, port, "kv/bench/value", query))
    if baseline:
        server, port, query = start_edge(work, "full", baseline, "-baseline")
        targets.append(Target("konsul edge (baseline)", server, port, "kv/bench/value", query))
    return targets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case and round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets (the median is reported)")
    parser.add_argument("--endpoints", type=int, default=32, help="client endpoints (sockets) in parallel")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per PUT")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of " + ",".join(TARGETS) + " (the bare aiocoap server always runs)",
    )
    parser.add_argument(
        "--baseline-python",
        help="also measure the edge (full) of another checkout, run by this interpreter "
        "(e.g. /work/main/.venv/bin/python): before and after in the same rounds",
    )
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--under-trio", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_aiocoap_server(args.bare_server, args.under_trio, args.batched)
        return 0
    libcoap = shutil.which("coap-server") or shutil.which("coap-server-notls")
    if libcoap is None:
        sys.exit("libcoap's coap-server is missing: apt-get install libcoap3-bin (scripts/setup does)")
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
        f"{platform.machine()}  {os.cpu_count()} CPUs  Python {platform.python_version()}  "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# {args.endpoints} endpoints, {args.rounds} rounds of {args.seconds:g} s per case "
        f"(after {args.warmup:g} s warm-up), PUT of {args.value_size} bytes; median of the rounds\n"
    )
    rates: dict[tuple[str, str], list[float]] = {}
    costs: dict[tuple[str, str], list[float]] = {}  # server CPU microseconds per answered request
    with tempfile.TemporaryDirectory(prefix="konsul-coap-bench-") as tmp:
        targets: list[Target] = []
        try:
            targets = start_targets(Path(tmp), libcoap, args.targets.split(","), args.baseline_python)
            # Rounds interleave the targets, so a burst of other load on the
            # machine hits all of them alike instead of one.
            for round_number in range(1, args.rounds + 1):
                for target in targets:
                    for code, op in ((GET, "GET"), (PUT, "PUT")):
                        result, cpu = measure(target, code, args)
                        rates.setdefault((target.name, op), []).append(result.rate)
                        cost = 1e6 * cpu / result.rate if result.rate else float("inf")
                        costs.setdefault((target.name, op), []).append(cost)
                        print(
                            f"round {round_number}  {target.name:<22} {op}  {result.rate:>8,.0f} req/s  "
                            f"server CPU {cpu:>4.0%} = {cost:>5.0f} us/req   bad {result.bad:>3} "
                            f"{dict(result.bad_codes) or ''}  timeouts {result.timeouts:>3}  "
                            f"separate {result.separate / max(1, result.ok + result.bad):.0%}",
                            flush=True,
                        )
        finally:
            for target in targets:
                target.server.stop()
    median = {case: statistics.median(values) for case, values in rates.items()}
    cost = {case: statistics.median(values) for case, values in costs.items()}
    nan = float("nan")
    print(f"\n# medians (load average now {os.getloadavg()[0]:.2f}); capacity = 1 / server CPU per request")
    for op in ("GET", "PUT"):
        print(f"{op}")
        for name in [t for t, o in median if o == op]:
            print(f"  {name:<24} {median[(name, op)]:>8,.0f} req/s  {cost[(name, op)]:>6.0f} us CPU/req")
        bare, libcoap_rate = ("bare aiocoap", op), ("libcoap coap-server", op)
        for name in [t for t, o in median if o == op and t.startswith(("konsul", "bare aiocoap/"))]:
            case = (name, op)
            print(
                f"  {name:<24} req/s: {median[case] / median[bare]:.2f}x bare aiocoap, "
                f"{median[case] / median.get(libcoap_rate, nan):.3f}x libcoap;  capacity: "
                f"{cost[bare] / cost[case]:.2f}x bare aiocoap, {cost.get(libcoap_rate, nan) / cost[case]:.3f}x libcoap"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

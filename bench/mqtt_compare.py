"""MQTT benchmark: mosquitto, this checkout's edge and the previous amqtt-based edge, in one run.

    .venv/bin/python bench/mqtt_compare.py            # --help for options

Three brokers, everything on 127.0.0.1:

- ``mosquitto``: Debian's, a generated config (one listener, anonymous, no
  persistence, no cap on queued messages, TCP_NODELAY);
- ``edge``: ``konsul edge`` of this checkout (this virtualenv), ACLs on,
  default durability ("full");
- ``edge-5b870d7``: the edge before issue 18 (amqtt 0.12 behind trio-asyncio),
  from a git worktree of commit 5b870d7 this script makes in a temporary
  directory and removes after; it runs on this virtualenv's packages with the
  worktree first on ``PYTHONPATH`` (a ``konsul`` directory of links to its
  package directories), so only the project's own code differs.

Cells: 1 -> 1 and 100 -> 1 at QoS 0 and QoS 1. Publishers send 64-byte
retained messages to ``konsul/v1/kv/bench/<cell>/p<i>/<n>``, a fresh KV key per
message, and one subscriber takes ``konsul/v1/kv/bench/<cell>/#`` at the same
QoS. On mosquitto that is a relay; on an edge every message is a durable KV
write (a QoS 1 PUBACK once it is on disk) announced to watchers as the key's
retained topic (docs/mqtt.md). The load tool is not the limit: the subscriber
is ``mosquitto_sub`` (C; its output is counted from a pipe), and the
publishers are raw-socket processes (up to ``--publisher-processes``, 4 by
default) writing pre-encoded PUBLISH packets, at QoS 1 with at most 20 in
flight per publisher (paho's default, as bench/mqtt.py). Throughput is
messages the subscriber received per second, from the start signal to the
last delivery; broker CPU per delivered message is the broker process's
utime + stime (``/proc/<pid>/stat``, all threads) over the cell, divided by
messages delivered. Each cell runs ``--reps`` times on a fresh broker
(retained messages pile up, one per message), the brokers interleaved so a
burst of other load on the machine hits all alike; the median rate and the median CPU per
message are reported (each on its own).

Memory: VmRSS of each broker idle, and with ``--idle`` (10,000) idle clients
connected by several processes (2,500 sockets each, keep-alive 600 s;
anonymous devices on the edges, run with ``--allow-anonymous``, and caps raised
with ``--mqtt-max-connections``, ``--mqtt-max-connections-per-source`` and
``--anonymous-max-devices``). The script raises its open-files limit to the
hard limit first; the brokers inherit it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREVIOUS_EDGE = "5b870d7"  # the last amqtt-based edge, before issue 18
MANAGEMENT_TOKEN = "6d7a3f0e-0b1c-4c55-9d27-b0e5c0000002"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_BYTES = 64
WINDOW = 20  # QoS 1 messages in flight per publisher
CELLS = [(1, 0), (1, 1), (100, 0), (100, 1)]
IDLE_PER_PROCESS = 2500
# The package directories of a checkout, as pyproject.toml maps them under ``konsul``.
PACKAGE_DIRS = {"edge": "edge", "hub": "hub", "sync": "sync", "protocols": "protocols",
                "simulator": "firmware_examples/simulator", "cli": "cli"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- MQTT 3.1.1 packets the load tool sends (a few lines, so the tool does not depend on the
# codec under test) ---------------------------------------------------------------------------

def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _frame(header: int, body: bytes) -> bytes:
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return bytes([header]) + length + body


def connect_packet(client_id: str, token: str | None, keepalive: int = 60) -> bytes:
    flags = 0x02 | (0xC0 if token is not None else 0)
    body = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _text(client_id)
    if token is not None:
        body += _text(client_id) + _text(token)
    return _frame(0x10, body)


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = _text(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _frame(0x30 | (qos << 1) | 0x01, body)  # retained


def read_connack(sock: socket.socket) -> None:
    answer = b""
    while len(answer) < 4:
        chunk = sock.recv(4 - len(answer))
        if not chunk:
            raise RuntimeError("connection closed before CONNACK")
        answer += chunk
    if answer != b"\x20\x02\x00\x00":
        raise RuntimeError(f"CONNECT refused: {answer.hex()}")


# -- brokers ----------------------------------------------------------------------------------

@dataclass
class Broker:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    credentials: dict[str, str] = field(default_factory=dict)
    http_url: str = ""

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, argv: list[str], ready: str, workdir: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path, str]:
    log_path = workdir / f"{name}.log"
    proc = subprocess.Popen(argv, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=workdir,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if ready in text:
            return proc, log_path, text
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{name} did not start:\n{log_path.read_text()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mosquitto(workdir: Path, publishers: int) -> Broker:
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
        "set_tcp_nodelay true\nlog_dest stderr\n"
    )
    proc, log_path, _ = _spawn("mosquitto", ["mosquitto", "-c", str(config)], "running", workdir)
    return Broker("mosquitto", proc, log_path, port)


def start_edge(name: str, workdir: Path, publishers: int, pythonpath: str | None, idle: int) -> Broker:
    """An edge (``pythonpath``: another checkout's ``konsul``, else this one), devices registered."""
    caps = str(max(idle + 1000, 10_000))
    argv = [
        sys.executable, "-m", "konsul.edge.cli", "edge", "--site", "bench", "--data-dir", str(workdir / "data"),
        "--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "", "--dns-addr", "",
        "--allow-anonymous", "--acl-initial-management", MANAGEMENT_TOKEN,
        "--mqtt-max-connections", caps, "--mqtt-max-connections-per-source", caps, "--anonymous-max-devices", caps,
    ]
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    proc, log_path, text = _spawn(name, argv, "http listening on", workdir, env)
    broker = Broker(name, proc, log_path)
    broker.port = int(text.split("mqtt listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
    broker.http_url = text.split("http listening on ", 1)[1].split()[0]
    with httpx.Client(base_url=broker.http_url, timeout=30, headers={"X-Consul-Token": MANAGEMENT_TOKEN}) as http:
        devices = [("bench-sub", {})] + [(f"bench-pub-{i}", {"KVWrite": ["bench/"]}) for i in range(publishers)]
        for device_id, fields in devices:
            response = http.put(f"/v1/devices/{device_id}", json={"Type": "bench", **fields})
            response.raise_for_status()
            broker.credentials[device_id] = response.json()["Token"]
    return broker


@contextmanager
def previous_edge_checkout(parent: Path, commit: str):
    """A git worktree of ``commit`` and a ``konsul`` directory of links into it; yields the PYTHONPATH."""
    tree = parent / f"konsul-{commit}"
    subprocess.run(["git", "-C", str(PROJECT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    try:
        shim = parent / f"pythonpath-{commit}" / "konsul"
        shim.mkdir(parents=True)
        for name, directory in PACKAGE_DIRS.items():
            if (tree / directory).is_dir():
                (shim / name).symlink_to(tree / directory)
        yield str(shim.parent)
    finally:
        subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(tree)], capture_output=True)


# -- the load: publisher processes and mosquitto_sub -------------------------------------------

def publisher_process(pipe, port: int, clients: list[tuple[int, str | None]], cell: str, qos: int, per_publisher: int) -> None:
    """Publishers ``clients`` ([(index, token)]) on raw sockets, driven by one epoll loop."""
    selector = selectors.DefaultSelector()
    socks = []
    for index, token in clients:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(f"bench-pub-{index}", token))
        read_connack(sock)
        socks.append(sock)
    # Every message encoded before the clock starts.
    packets = [
        [publish_packet(f"konsul/v1/kv/bench/{cell}/p{index}/{n}", f"{index}:{n}:".encode().ljust(PAYLOAD_BYTES, b"."),
                        qos, (n % 65535) + 1) for n in range(per_publisher)]
        for index, _ in clients
    ]
    pipe.send("ready")
    pipe.recv()
    started = time.monotonic()
    if qos == 0:
        chunk = 64
        positions = [0] * len(socks)
        remaining = len(socks)
        while remaining:
            for i, sock in enumerate(socks):
                if positions[i] < per_publisher:
                    sock.sendall(b"".join(packets[i][positions[i]:positions[i] + chunk]))
                    positions[i] += chunk
                    if positions[i] >= per_publisher:
                        remaining -= 1
    else:
        sent = [0] * len(socks)
        acked = [0] * len(socks)
        pending = [b""] * len(socks)
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
            sock.sendall(b"".join(packets[i][:WINDOW]))  # small: fits the socket buffer
            sent[i] = min(WINDOW, per_publisher)
        done: set[int] = set()
        while len(done) < len(socks):
            for key, _ in selector.select(10):
                i = key.data
                data = pending[i] + key.fileobj.recv(65536)
                count, rest = divmod(len(data), 4)  # PUBACKs only: 4 bytes each
                pending[i] = data[len(data) - rest:] if rest else b""
                if not count and not data:
                    raise RuntimeError("a publisher's connection closed")
                acked[i] += count
                more = min(per_publisher, acked[i] + WINDOW)
                if more > sent[i]:
                    key.fileobj.setblocking(True)
                    key.fileobj.sendall(b"".join(packets[i][sent[i]:more]))
                    key.fileobj.setblocking(False)
                    sent[i] = more
                if acked[i] >= per_publisher:
                    done.add(i)
    pipe.send((started, time.monotonic(), per_publisher * len(socks)))
    pipe.recv()  # done: stay connected until the subscriber has everything
    for sock in socks:
        sock.sendall(b"\xe0\x00")
        sock.close()


def put_marker(broker: Broker, topic: str) -> None:
    """A retained message on ``topic`` (QoS 1, acknowledged), from publisher 0."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=30) as sock:
        sock.sendall(connect_packet("bench-pub-0", broker.credentials.get("bench-pub-0")))
        read_connack(sock)
        sock.sendall(publish_packet(topic, b"ready", 1, 1))
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise RuntimeError(f"{broker.name} closed the connection instead of acknowledging {topic}")
            answer += chunk
        sock.sendall(b"\xe0\x00")


def mosquitto_sub(broker: Broker, topic_filter: str, qos: int) -> subprocess.Popen:
    """mosquitto_sub printing one payload a line, flushed per line (``stdbuf -oL``: to a pipe it
    would otherwise hold its output in a buffer)."""
    argv = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", "bench-sub",
            "-q", str(qos), "-t", topic_filter, "-k", "120"]
    token = broker.credentials.get("bench-sub")
    if token:
        argv += ["-u", "bench-sub", "-P", token]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)


def run_cell(broker: Broker, cell: str, publishers: int, qos: int, total: int, processes: int) -> dict:
    per_publisher = max(1, total // publishers)
    expected = per_publisher * publishers
    # The subscription is in place once the retained marker arrives (mosquitto_sub says
    # nothing of its SUBACK without -d, whose three lines a message would cost it more).
    put_marker(broker, f"konsul/v1/kv/bench/{cell}/ready")
    subscriber = mosquitto_sub(broker, f"konsul/v1/kv/bench/{cell}/#", qos)
    assert subscriber.stdout is not None
    seen = b""
    while b"ready\n" not in seen:
        chunk = subscriber.stdout.read(4096)
        if not chunk:
            raise RuntimeError(f"mosquitto_sub ended: {seen.decode(errors='replace')}")
        seen += chunk
    context = multiprocessing.get_context("fork")
    groups = [list(range(publishers))[k::processes] for k in range(min(processes, publishers))]
    pipes, workers = [], []
    for group in groups:
        ours, theirs = context.Pipe()
        clients = [(i, broker.credentials.get(f"bench-pub-{i}")) for i in group]
        worker = context.Process(target=publisher_process, args=(theirs, broker.port, clients, cell, qos, per_publisher))
        worker.start()
        pipes.append(ours)
        workers.append(worker)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    cpu_before = broker.cpu_seconds()
    went = time.monotonic()
    for pipe in pipes:
        pipe.send("go")
    # Count payload lines (they start with a digit: "<publisher>:<n>:....") until all came or
    # none came for 10 s.
    received, last, buffer = 0, went, b""
    selector = selectors.DefaultSelector()
    selector.register(subscriber.stdout, selectors.EVENT_READ)
    while received < expected:
        if not selector.select(10):
            break
        chunk = subscriber.stdout.read(1 << 16)
        if not chunk:
            break
        lines = (buffer + chunk).split(b"\n")
        buffer = lines.pop()
        got = sum(1 for line in lines if line[:1].isdigit())
        if got:
            received += got
            last = time.monotonic()
    cpu = broker.cpu_seconds() - cpu_before
    finished = [pipe.recv() for pipe in pipes]
    for pipe in pipes:
        pipe.send("done")
    for worker in workers:
        worker.join(30)
    subscriber.terminate()
    subscriber.wait(10)
    sent = sum(count for _, _, count in finished)
    published = max(end for _, end, _ in finished) - went
    return {"sent": sent, "received": received, "rate": received / max(last - went, 1e-9),
            "publish_rate": sent / max(published, 1e-9), "cpu_us": 1e6 * cpu / max(received, 1)}


def idle_process(pipe, port: int, first: int, count: int) -> None:
    """``count`` idle clients (anonymous ``idle-<n>``), connected one after another, held until told."""
    socks = []
    for n in range(first, first + count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(connect_packet(f"idle-{n}", None, keepalive=600))
        read_connack(sock)
        socks.append(sock)
    pipe.send("connected")
    pipe.recv()
    for sock in socks:
        sock.close()


def idle_rss(broker: Broker, count: int) -> int:
    """VmRSS (KiB) of ``broker`` with ``count`` idle clients connected."""
    context = multiprocessing.get_context("fork")
    pipes, workers = [], []
    for first in range(0, count, IDLE_PER_PROCESS):
        ours, theirs = context.Pipe()
        worker = context.Process(target=idle_process, args=(theirs, broker.port, first, min(IDLE_PER_PROCESS, count - first)))
        worker.start()
        pipes.append(ours)
        workers.append(worker)
    for pipe in pipes:
        if not pipe.poll(600):
            raise RuntimeError(f"{broker.name}: idle clients did not connect within 10 minutes")
        assert pipe.recv() == "connected"
    time.sleep(2.0)  # let allocations settle before reading VmRSS
    rss = broker.rss_kb()
    for pipe in pipes:
        pipe.send("go")
    for worker in workers:
        worker.join(60)
    return rss


# -- the run -----------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, load average {load}"


def head_commit() -> str:
    described = subprocess.run(["git", "-C", str(PROJECT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return described.stdout.strip()[:80] + (" (plus uncommitted changes)" if dirty else "")


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def median(cells: list[dict]) -> dict:
    """The median run by rate, with the median CPU per message of all runs (the two apart)."""
    ordered = sorted(cells, key=lambda cell: cell["rate"])
    cpu = sorted(cell["cpu_us"] for cell in cells)
    return {**ordered[len(ordered) // 2], "cpu_us": cpu[len(cpu) // 2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="messages per QoS 0 cell (QoS 1 cells send half)")
    parser.add_argument("--reps", type=int, default=3, help="runs per cell, each on a fresh broker (median reported)")
    parser.add_argument("--cells", default=",".join(f"{p}q{q}" for p, q in CELLS),
                        help="which cells, as PUBLISHERSqQOS, comma-separated (e.g. 100q0)")
    parser.add_argument("--idle", type=int, default=10_000, help="idle clients for the memory figure (0: none)")
    parser.add_argument("--brokers", default=f"mosquitto,edge,edge-{PREVIOUS_EDGE}", help="which brokers, comma-separated")
    parser.add_argument("--publisher-processes", type=int, default=4, help="processes the publishers are spread over")
    args = parser.parse_args()
    # Stopped with SIGTERM (timeout, kill), still remove the brokers and the git worktree.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("mosquitto", "mosquitto_sub", "git"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (scripts/setup installs mosquitto and mosquitto-clients)")
    if f"edge-{PREVIOUS_EDGE}" in args.brokers.split(","):
        try:
            import amqtt  # noqa: F401 - the previous edge's broker
        except ImportError:
            sys.exit(f"edge-{PREVIOUS_EDGE} needs amqtt: .venv/bin/pip install -e '.[bench]'")
    nofile = raise_open_files_limit()
    if args.idle and nofile < args.idle * 4 // 3 + 1000:
        sys.exit(f"the open-files limit is {nofile}: too low for {args.idle} idle clients (raise the hard limit)")
    names = [name for name in args.brokers.split(",") if name]
    wanted = set(args.cells.split(","))
    cells = [(p, q) for p, q in CELLS if f"{p}q{q}" in wanted]
    log(machine())
    log(f"edge: {head_commit()}; edge-{PREVIOUS_EDGE}: a worktree of {PREVIOUS_EDGE}; open files {nofile}")
    results: dict[str, dict] = {name: {} for name in names}
    with tempfile.TemporaryDirectory(prefix="konsul-mqtt-compare-") as tmp_name:
        tmp = Path(tmp_name)
        with previous_edge_checkout(tmp, PREVIOUS_EDGE) as previous_path:
            starters = {
                "mosquitto": lambda d: start_mosquitto(d, 100),
                "edge": lambda d: start_edge("edge", d, 100, None, args.idle),
                f"edge-{PREVIOUS_EDGE}": lambda d: start_edge(f"edge-{PREVIOUS_EDGE}", d, 100, previous_path, args.idle),
            }

            @contextmanager
            def fresh(name: str):
                broker = starters[name](Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp)))
                try:
                    yield broker
                finally:
                    broker.stop()

            if args.idle:
                for name in names:
                    with fresh(name) as broker:
                        time.sleep(1.0)
                        results[name]["rss_idle"] = broker.rss_kb()
                        started = time.monotonic()
                        results[name]["rss_clients"] = idle_rss(broker, args.idle)
                    log(f"{name}: {results[name]['rss_idle'] / 1024:.1f} MiB idle, "
                        f"{results[name]['rss_clients'] / 1024:.1f} MiB with {args.idle} idle clients "
                        f"(connected in {time.monotonic() - started:.0f} s)")
            for publishers, qos in cells:
                total = args.messages if qos == 0 else args.messages // 2
                runs: dict[str, list[dict]] = {name: [] for name in names}
                for _ in range(args.reps):
                    for name in names:
                        with fresh(name) as broker:
                            cell = run_cell(broker, f"{publishers}q{qos}", publishers, qos, total, args.publisher_processes)
                        runs[name].append(cell)
                        log(f"{name}: {publishers:>3} -> 1 QoS {qos}: {cell['rate']:>8,.0f} msg/s delivered "
                            f"({cell['received']}/{cell['sent']}), broker CPU {cell['cpu_us']:.1f} us/msg")
                for name in names:
                    results[name][(publishers, qos)] = median(runs[name])
    print(report(results, names, cells, args))
    return 0


def report(results: dict, names: list[str], cells: list[tuple[int, int]], args: argparse.Namespace) -> str:
    previous = f"edge-{PREVIOUS_EDGE}"
    lines = [
        f"machine: {machine()}",
        f"edge: {head_commit()}",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; messages per QoS 0 cell {args.messages} (QoS 1: half); "
        f"median of {args.reps}",
        "",
        "delivered msg/s (received/sent; broker CPU per delivered message)",
        f"{'cell':<16}" + "".join(f"{name:>32}" for name in names)
        + (f"{'edge/mosquitto':>22}" if "edge" in names and "mosquitto" in names else "")
        + (f"{'edge/previous':>22}" if "edge" in names and previous in names else ""),
    ]
    for publishers, qos in cells:
        row = f"{publishers:>3} -> 1, QoS {qos} "
        for name in names:
            cell = results[name][(publishers, qos)]
            row += f"{cell['rate']:>9,.0f} ({cell['received']}/{cell['sent']}; {cell['cpu_us']:.1f} us)".rjust(32)
        edge = results.get("edge", {}).get((publishers, qos))
        for peer in ("mosquitto", previous):
            if edge and peer in names:
                other = results[peer][(publishers, qos)]
                rate = f"{edge['rate'] / other['rate']:.2f}x" if other["rate"] else "-"
                # "-": less CPU than one clock tick measured (a short run)
                cpu = f"{edge['cpu_us'] / other['cpu_us']:.1f}x" if other["cpu_us"] else "-"
                row += f"{rate} rate, {cpu} CPU".rjust(22)
        lines.append(row)
    if args.idle:
        lines += ["", f"resident memory, MiB: idle / with {args.idle} idle clients / KiB per client"]
        for name in names:
            idle, held = results[name]["rss_idle"], results[name]["rss_clients"]
            lines.append(f"  {name:<16} {idle / 1024:7.1f} / {held / 1024:7.1f} / {(held - idle) / args.idle:6.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""MQTT benchmark: the embedded broker of ``konsul edge`` against bare amqtt and mosquitto.

Run it as ``.venv/bin/python bench/mqtt.py`` (``--help`` for options; needs the
``mosquitto`` Debian package). One load tool, paho-mqtt, drives three brokers
in the same run, everything on 127.0.0.1:

- ``konsul edge`` (standalone, default durability "full", anonymous devices
  allowed for the idle clients; publishers and subscriber are registered
  devices with tokens), and the same with ``--durability relaxed``
  ("konsul-relaxed": no fsync per commit), which separates the cost of the
  disk from the cost of the gateway;
- a bare amqtt broker on plain asyncio (same amqtt, anonymous auth plugin only);
- mosquitto (Debian's, a generated config: one listener, anonymous, TCP_NODELAY).

MQTT over TLS: ``konsul-edge-tls``, ``konsul-relaxed-tls`` and
``mosquitto-tls`` are the same brokers with clients connecting to their TLS
listener instead (a CA and a server certificate for 127.0.0.1 made with
trustme for the run; TLS 1.3, the default of both ends). The report then
adds TLS/plain ratios, and ``--connects N`` measures connection set-up: N
connections one after another (TCP, TLS handshake, CONNECT, CONNACK,
DISCONNECT) from one client, per second, with the broker's CPU per connection.

Workload: publishers send 64-byte retained messages to ``konsul/v1/kv/bench/
<run>/p<i>/<n>`` (a fresh KV key per message) and one subscriber takes
``konsul/v1/kv/bench/<run>/#`` at the same QoS: 1 -> 1 and 100 -> 1, QoS 0
and QoS 1. On the bare brokers that is a relay. On the edge it is what the
topic contract makes of it, the only device-to-device path there is: every
message is a KV write, applied in group-committed transactions (a QoS 1
PUBACK waits until it is durable), then announced to watchers as the key's
retained topic. Throughput is messages the subscriber received per second,
from the first publish to the last delivery.

Publishers run in one process, the subscriber in another, each a single
thread driving its paho clients through epoll (paho's own loop uses select(),
which cannot go past file descriptor 1024). QoS 1 publishers keep at most 20
messages in flight each (paho's default).

Every cell runs ``--reps`` times, each on a fresh broker (retained messages
pile up, one per message, and amqtt slows down with every one), and the
median is reported, with the broker's CPU time per delivered message.

Memory: resident set (VmRSS) of each broker idle, and with 1,000 idle clients
connected (keep-alive 120 s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt

VENV_BIN = Path(sys.executable).parent
# The edge runs with ACLs on (its default) and this management token, which creates the devices.
MANAGEMENT_TOKEN = "6d7a3f0e-0b1c-4c55-9d27-b0e5c0000001"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_BYTES = 64
WINDOW = 20  # QoS 1 messages in flight per publisher
SCENARIOS = [(1, 0), (1, 1), (100, 0), (100, 1)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- brokers ------------------------------------------------------------------------------


class Broker:
    def __init__(self, name: str, argv: list[str], ready: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, cwd=workdir)
        self.port = 0
        self.credentials: dict[str, str] = {}  # device id -> token (edge only)
        self.ca: str | None = None  # with a CA file, clients connect over TLS (to ``port``)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            if ready in text:
                self.log_text = text
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{name} did not start:\n{self.log_path.read_text()}")

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
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Certificates:
    """A CA and a server certificate for 127.0.0.1, made once per run (trustme, from the test extra)."""

    def __init__(self, directory: Path) -> None:
        import trustme

        authority = trustme.CA()
        issued = authority.issue_cert("127.0.0.1", "localhost")
        self.ca, self.cert, self.key = (str(directory / name) for name in ("ca.pem", "cert.pem", "key.pem"))
        authority.cert_pem.write_to_path(self.ca)
        issued.cert_chain_pems[0].write_to_path(self.cert)
        issued.private_key_pem.write_to_path(self.key)


def start_edge(
    workdir: Path, publishers: int, durability: str = "full", venv_bin: Path | None = None, acl: bool | None = True,
    tls: Certificates | None = None,
) -> Broker:
    """The edge; ``acl`` True: ACLs on with a management token creating the devices, False: ``--acl off``,
    None: neither flag (a baseline checkout that may predate them). ``tls``: clients use its TLS listener."""
    tls_flags = [] if tls is None else [
        "--tls-cert", tls.cert, "--tls-key", tls.key, "--mqtts-addr", "127.0.0.1:0", "--mqtt-addr", ""]
    broker = Broker(
        "konsul-edge",
        [str((venv_bin or VENV_BIN) / "konsul"), "edge", "--site", "bench", "--data-dir", str(workdir / "edge-data"),
         "--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "", "--allow-anonymous",
         "--durability", durability, *_acl_flags(acl), *tls_flags],
        "http listening on",
        workdir,
    )
    text = broker.log_text
    listening = "mqtt listening on " if tls is None else "mqtts listening on "
    broker.port = int(text.split(listening, 1)[1].split()[0].rsplit(":", 1)[1])
    broker.ca = None if tls is None else tls.ca
    http_url = text.split("http listening on ", 1)[1].split()[0]
    broker.http_url = http_url
    # The HTTP API may be served over TLS with the same certificate.
    verify = True if tls is None else ssl.create_default_context(cafile=tls.ca)
    broker.http_verify = verify
    with httpx.Client(base_url=http_url, timeout=30, headers={"X-Consul-Token": MANAGEMENT_TOKEN}, verify=verify) as http:
        for device_id, fields in [("bench-sub", {})] + [(f"bench-pub-{i}", {"KVWrite": ["bench/"]}) for i in range(publishers)]:
            response = http.put(f"/v1/devices/{device_id}", json={"Type": "bench", **fields})
            response.raise_for_status()
            broker.credentials[device_id] = response.json()["Token"]
    return broker


def _acl_flags(acl: bool | None) -> list[str]:
    if acl is None:
        return []
    return ["--acl-initial-management", MANAGEMENT_TOKEN] if acl else ["--acl", "off"]


def start_amqtt(workdir: Path) -> Broker:
    from socket import socket

    with socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    broker = Broker("amqtt", [sys.executable, __file__, "--serve-amqtt", str(port)], "amqtt ready", workdir)
    broker.port = port
    return broker


def serve_amqtt(port: int) -> None:
    """The bare amqtt peer: plain asyncio, anonymous auth only, quiet logs."""
    import asyncio
    import logging

    from amqtt.broker import Broker as AmqttBroker

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        broker = AmqttBroker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await broker.start()
        print("amqtt ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_mosquitto(workdir: Path, tls: Certificates | None = None) -> Broker:
    from socket import socket

    with socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = workdir / "mosquitto.conf"
    # No cap on queued QoS 1 messages: by default mosquitto drops past 1,000 per
    # client, and amqtt never does, so the two would not deliver the same work.
    tls_lines = "" if tls is None else f"certfile {tls.cert}\nkeyfile {tls.key}\n"
    if tls is not None and os.geteuid() == 0:
        # Started as root, mosquitto drops to user "mosquitto" before reading the
        # files, which then lie in a directory only root may enter.
        tls_lines += "user root\n"
    # TCP_NODELAY like asyncio's transports (the edge): over TLS, mosquitto's
    # CONNACK otherwise waits behind its session tickets for a delayed ACK, 40 ms.
    config.write_text(
        f"listener {port} 127.0.0.1\n{tls_lines}allow_anonymous true\npersistence false\nmax_queued_messages 0\n"
        "set_tcp_nodelay true\nlog_dest stderr\n"
    )
    broker = Broker("mosquitto", ["mosquitto", "-c", str(config)], "running", workdir)
    broker.port = port
    broker.ca = None if tls is None else tls.ca
    return broker


# -- the paho load tool ---------------------------------------------------------------------


class Pool:
    """paho clients driven by one thread through epoll."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self.connected = 0

    def add(self, port: int, client_id: str, token: str | None, keepalive: int = 60, ca: str | None = None) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        client.max_inflight_messages_set(WINDOW)
        if token is not None:
            client.username_pw_set(client_id, token)
        if ca is not None:
            client.tls_set(ca_certs=ca)
        client.on_connect = self._on_connect
        client.connect("127.0.0.1", port, keepalive=keepalive)
        self.selector.register(client.socket(), selectors.EVENT_READ, client)
        self.clients.append(client)
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            raise RuntimeError(f"{client._client_id!r} refused: {reason_code}")
        self.connected += 1

    def pump(self, timeout: float = 0.0) -> None:
        # TLS: what OpenSSL has decrypted already is no longer on the socket, and epoll cannot see it.
        pending = [client for client in self.clients if getattr(client.socket(), "pending", lambda: 0)()]
        for client in pending:
            client.loop_read()
        for key, _ in self.selector.select(0 if pending else timeout):
            key.data.loop_read()
        for client in self.clients:
            if client.want_write():
                client.loop_write()

    def wait_connected(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connected < len(self.clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.connected} of {len(self.clients)} clients connected")
            self.pump(0.05)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
        self.pump(0.1)


def subscriber(pipe, port: int, token: str | None, topic_filter: str, qos: int, expected: int, ca: str | None) -> None:
    pool = Pool()
    client = pool.add(port, "bench-sub", token, ca=ca)
    got = {"count": 0, "first": 0.0, "last": 0.0, "subscribed": False}

    def on_message(client, userdata, message) -> None:
        now = time.monotonic()
        got["count"] += 1
        got["first"] = got["first"] or now
        got["last"] = now

    client.on_message = on_message
    client.on_subscribe = lambda *args: got.update(subscribed=True)
    pool.wait_connected()
    client.subscribe(topic_filter, qos)
    while not got["subscribed"]:
        pool.pump(0.05)
    pipe.send("ready")
    pipe.recv()  # go: the publishers start now
    went = time.monotonic()
    while got["count"] < expected:
        pool.pump(0.05)
        if time.monotonic() - (got["last"] or went) > 10:  # nothing more is coming
            break
    pipe.send((got["count"], got["first"], got["last"]))
    pool.close()


def publishers(
    pipe, port: int, tokens: list[str | None], run: str, qos: int, per_publisher: int, ca: str | None
) -> None:
    pool = Pool()
    outstanding = [0] * len(tokens)
    for i, token in enumerate(tokens):
        client = pool.add(port, f"bench-pub-{i}", token, ca=ca)
        client.user_data_set(i)

        def on_publish(client, index, mid, reason_code, properties) -> None:
            outstanding[index] -= 1

        client.on_publish = on_publish
    pool.wait_connected()
    pipe.send("ready")
    pipe.recv()  # go
    started = time.monotonic()
    sent = [0] * len(tokens)
    remaining = len(tokens)
    while remaining:
        progress = False
        for i, client in enumerate(pool.clients):
            if sent[i] < per_publisher and (qos == 0 or outstanding[i] < WINDOW):
                payload = f"{i}:{sent[i]}:".encode().ljust(PAYLOAD_BYTES, b".")
                outstanding[i] += 1
                client.publish(f"konsul/v1/kv/bench/{run}/p{i}/{sent[i]}", payload, qos=qos, retain=True)
                sent[i] += 1
                progress = True
                if sent[i] == per_publisher:
                    remaining -= 1
        # With every window full, block for acknowledgements instead of spinning:
        # the broker needs the CPU more than we do.
        pool.pump(0 if progress else 0.01)
    while qos and any(outstanding):
        pool.pump(0.01)
    pipe.send((started, time.monotonic(), sum(sent)))
    pipe.recv()  # done: stay connected until the subscriber has everything
    pool.close()


def run_scenario(broker: Broker, run: str, publisher_count: int, qos: int, total: int) -> dict:
    per_publisher = max(1, total // publisher_count)
    expected = per_publisher * publisher_count
    sub_token = broker.credentials.get("bench-sub")
    pub_tokens = [broker.credentials.get(f"bench-pub-{i}") for i in range(publisher_count)]
    context = multiprocessing.get_context("fork")
    sub_pipe, sub_end = context.Pipe()
    pub_pipe, pub_end = context.Pipe()
    sub = context.Process(target=subscriber, args=(sub_end, broker.port, sub_token, f"konsul/v1/kv/bench/{run}/#", qos, expected, broker.ca))
    pub = context.Process(target=publishers, args=(pub_end, broker.port, pub_tokens, run, qos, per_publisher, broker.ca))
    sub.start()
    assert sub_pipe.recv() == "ready"
    pub.start()
    assert pub_pipe.recv() == "ready"
    cpu_before = broker.cpu_seconds()
    sub_pipe.send("go")
    pub_pipe.send("go")
    started, published_at, sent = pub_pipe.recv()
    received, first, last = sub_pipe.recv()
    cpu = broker.cpu_seconds() - cpu_before
    pub_pipe.send("done")
    sub.join(30)
    pub.join(30)
    seconds = max(last - started, 1e-9)
    return {
        "sent": sent, "received": received, "rate": received / seconds, "publish_rate": sent / max(published_at - started, 1e-9),
        "cpu_us": 1e6 * cpu / max(received, 1),
    }


def idle_clients(broker: Broker, count: int) -> int:
    """Resident KiB of ``broker`` with ``count`` idle clients connected."""
    context = multiprocessing.get_context("fork")
    pipe, end = context.Pipe()

    def hold(pipe) -> None:
        pool = Pool()
        for i in range(count):
            pool.add(broker.port, f"idle-{i}", None, keepalive=120, ca=broker.ca)
            if i % 50 == 49:
                pool.pump(0)
        pool.wait_connected(120)
        pipe.send("connected")
        pipe.recv()
        pool.close()

    process = context.Process(target=hold, args=(end,))
    process.start()
    assert pipe.recv() == "connected"
    if hasattr(broker, "http_url"):  # the edge: wait until it counts them all
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _edge_connected(broker) < count:
            time.sleep(0.1)
    time.sleep(1.0)  # let allocations settle before reading VmRSS
    rss = broker.rss_kb()
    pipe.send("go")
    process.join(60)
    return rss


def connect_rate(broker: Broker, count: int) -> dict:
    """``count`` connections one after another, each CONNECT, CONNACK, DISCONNECT: per second, broker CPU each.

    Raw sockets (paho's set-up costs more than the broker's): the edge's
    clients are its registered devices in turn, mosquitto's anonymous.
    """
    from konsul.protocols.mqtt import codec

    context = None
    if broker.ca is not None:
        context = ssl.create_default_context(cafile=broker.ca)
    devices = sorted(broker.credentials.items()) or [(f"conn-{i}", None) for i in range(100)]
    cpu_before = broker.cpu_seconds()
    started = time.monotonic()
    for i in range(count):
        device_id, token = devices[i % len(devices)]
        raw = socket.create_connection(("127.0.0.1", broker.port), timeout=30)
        # The handshake's last flight and the CONNECT are two small writes in a
        # row: with Nagle on, the second waits for a delayed ACK (40 ms).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw if context is None else context.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            sock.sendall(codec.encode_connect(device_id, keepalive=60, username=device_id if token else None,
                                              password=token))
            if sock.recv(4) != b"\x20\x02\x00\x00":
                raise RuntimeError(f"{broker.name}: {device_id} not connected")
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            sock.close()
    seconds = time.monotonic() - started
    return {"rate": count / seconds, "cpu_us": 1e6 * (broker.cpu_seconds() - cpu_before) / count}


def _edge_connected(broker: Broker) -> float:
    for line in httpx.get(f"{broker.http_url}/metrics", timeout=10, verify=broker.http_verify).text.splitlines():
        if line.startswith("konsul_mqtt_connected_devices "):
            return float(line.split()[1])
    return 0.0


# -- the run -----------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, load average {load}"


def fresh_dir(parent: str, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    return path


@contextmanager
def running(start, *args):
    broker = start(*args)
    try:
        yield broker
    finally:
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per QoS 0 run (QoS 1 runs send half)")
    parser.add_argument("--idle", type=int, default=1000, help="idle clients for the memory figure")
    parser.add_argument(
        "--brokers",
        default="konsul-edge,konsul-relaxed,amqtt,mosquitto",
        help="which brokers, comma-separated (konsul-relaxed: the edge with --durability relaxed; "
        "konsul-relaxed-acl-off: the same with --acl off; konsul-baseline: see --baseline-bin)",
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per cell, each on a fresh broker (median reported)")
    parser.add_argument(
        "--scenarios",
        default=",".join(f"{p}q{q}" for p, q in SCENARIOS),
        help="which cells, as PUBLISHERSqQOS, comma-separated (e.g. 1q1 for one publisher at QoS 1)",
    )
    parser.add_argument(
        "--baseline-bin",
        help="the bin directory of another checkout's virtualenv (e.g. /work/main/.venv/bin); "
        "broker konsul-baseline is its edge",
    )
    parser.add_argument("--connects", type=int, default=0,
                        help="also measure N connection set-ups one after another per broker (0: not)")
    parser.add_argument("--serve-amqtt", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_amqtt:
        serve_amqtt(args.serve_amqtt)
        return 0
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is missing: apt-get install mosquitto (scripts/setup does)")
    certificates: list[Certificates] = []  # made in the run's directory, below
    starters = {
        "konsul-edge": lambda d: start_edge(d, 100),
        "konsul-edge-tls": lambda d: start_edge(d, 100, tls=certificates[0]),
        "konsul-relaxed-tls": lambda d: start_edge(d, 100, "relaxed", tls=certificates[0]),
        "mosquitto-tls": lambda d: start_mosquitto(d, certificates[0]),
        "konsul-relaxed": lambda d: start_edge(d, 100, "relaxed"),
        "amqtt": start_amqtt,
        "konsul-baseline": lambda d: start_edge(d, 100, venv_bin=Path(args.baseline_bin), acl=None),
        "konsul-relaxed-acl-off": lambda d: start_edge(d, 100, "relaxed", acl=False),
        "mosquitto": start_mosquitto,
    }
    names = [name for name in args.brokers.split(",") if name]
    wanted = set(args.scenarios.split(","))
    scenarios = [(p, q) for p, q in SCENARIOS if f"{p}q{q}" in wanted]
    results: dict[str, dict] = {}
    log(machine())
    with tempfile.TemporaryDirectory(prefix="konsul-mqtt-bench-") as tmp:
        if any(name.endswith("-tls") for name in names):
            certificates.append(Certificates(Path(tmp)))
        for name in names:
            figures = results[name] = {}
            if args.idle:
                with running(starters[name], fresh_dir(tmp, name)) as broker:
                    figures["rss_idle"] = broker.rss_kb()
                    figures["rss_clients"] = idle_clients(broker, args.idle)
                log(f"{name}: {figures['rss_idle'] / 1024:.1f} MiB idle, {figures['rss_clients'] / 1024:.1f} MiB with {args.idle} clients")
        for _ in range(args.reps if args.connects else 0):
            for name in names:  # interleaved, like the cells below
                with running(starters[name], fresh_dir(tmp, name)) as broker:
                    cell = connect_rate(broker, args.connects)
                results[name].setdefault("connects", []).append(cell)
                log(f"{name}: {cell['rate']:,.0f} connections/s, broker CPU {cell['cpu_us']:.0f} us each")
        for publisher_count, qos in scenarios:
            total = args.messages if qos == 0 else args.messages // 2
            cells: dict[str, list[dict]] = {name: [] for name in names}
            # Repetitions interleave the brokers, so a burst of other load on
            # the machine hits all of them alike instead of one. A fresh broker
            # for every measurement: retained messages pile up (one per
            # message here), and amqtt slows down with every one.
            for _ in range(args.reps):
                for name in names:
                    with running(starters[name], fresh_dir(tmp, name)) as broker:
                        cell = run_scenario(broker, f"{publisher_count}q{qos}", publisher_count, qos, total)
                    cells[name].append(cell)
                    log(f"{name}: {publisher_count:>3} -> 1 QoS {qos}: {cell['rate']:>8,.0f} msg/s delivered "
                        f"({cell['received']}/{cell['sent']}), broker CPU {cell['cpu_us']:.0f} us/msg")
            for name in names:
                ordered = sorted(cells[name], key=lambda c: c["rate"])
                results[name][(publisher_count, qos)] = ordered[len(ordered) // 2]
    print(report(results, names, scenarios, args))
    return 0


def _ratio(a: float, b: float) -> str:
    """``a / b`` as ``1.23x``; ``-`` when ``b`` is below the clock tick's resolution (no CPU time measured)."""
    return f"{a / b:.2f}x" if b > 0 else "-"


def report(results: dict, names: list[str], scenarios: list[tuple[int, int]], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {machine()}",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; messages per QoS 0 cell {args.messages} (QoS 1: half); median of {args.reps}",
        "",
        "delivered msg/s (received/sent; broker CPU per message)",
    ]
    header = f"{'scenario':<16}" + "".join(f"{name:>31}" for name in names)
    if "konsul-edge" in names and "amqtt" in names:
        header += f"{'edge/amqtt':>12}"
    if "konsul-edge" in names and "mosquitto" in names:
        header += f"{'edge/mosquitto':>16}"
    if "konsul-edge" in names and "konsul-baseline" in names:
        header += f"{'edge/baseline':>15}"
    lines.append(header)
    for publisher_count, qos in scenarios:
        row = f"{publisher_count:>3} -> 1, QoS {qos} "
        for name in names:
            cell = results[name][(publisher_count, qos)]
            row += f"{cell['rate']:>10,.0f} ({cell['received']}/{cell['sent']}; {cell['cpu_us']:.0f} us)".rjust(31)
        edge = results.get("konsul-edge", {}).get((publisher_count, qos))
        for peer, width in (("amqtt", 12), ("mosquitto", 16), ("konsul-baseline", 15)):
            if edge and peer in names:
                rate = results[peer][(publisher_count, qos)]["rate"]
                row += f"{edge['rate'] / rate:>{width - 1}.2f}x" if rate else f"{'-':>{width}}"
        lines.append(row)
    pairs = [(plain, f"{plain}-tls") for plain in ("konsul-edge", "konsul-relaxed", "mosquitto") if
             plain in names and f"{plain}-tls" in names]
    if pairs:
        lines += ["", "TLS / plain, delivered msg/s (broker CPU per message)"]
        lines.append(f"{'scenario':<16}" + "".join(f"{tls:>34}" for _plain, tls in pairs))
        for publisher_count, qos in scenarios:
            row = f"{publisher_count:>3} -> 1, QoS {qos} "
            for plain, tls in pairs:
                a, b = results[plain][(publisher_count, qos)], results[tls][(publisher_count, qos)]
                row += f"{b['rate'] / a['rate']:.2f}x ({_ratio(b['cpu_us'], a['cpu_us'])} CPU)".rjust(34)
            lines.append(row)
    if args.connects:
        lines += ["", f"connection set-up, {args.connects} one after another: per second (broker CPU each), median of {args.reps}"]
        for name in names:
            ordered = sorted(results[name]["connects"], key=lambda c: c["rate"])
            cell = results[name]["connects_median"] = ordered[len(ordered) // 2]
            lines.append(f"  {name:<20} {cell['rate']:>8,.0f}/s ({cell['cpu_us']:.0f} us)")
        for plain, tls in pairs:
            a, b = results[plain]["connects_median"], results[tls]["connects_median"]
            lines.append(f"  {tls} / {plain}: {b['rate'] / a['rate']:.2f}x the rate, {_ratio(b['cpu_us'], a['cpu_us'])} the CPU")
    if not args.idle:
        return "\n".join(lines)
    lines.append("")
    lines.append(f"resident memory, MiB: idle / with {args.idle} idle clients")
    for name in names:
        lines.append(f"  {name:<12} {results[name]['rss_idle'] / 1024:6.1f} / {results[name]['rss_clients'] / 1024:6.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

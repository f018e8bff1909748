"""Telemetry benchmark: durable ingest at the edge over MQTT QoS 1, and forwarding to the hub.

Run it as ``.venv/bin/python bench/telemetry.py`` (``--help`` for options;
needs the ``mosquitto`` and ``mosquitto-clients`` Debian packages, which
``scripts/setup`` installs).

Load: 10 devices, each one ``mosquitto_pub -l -q 1`` process (C, libmosquitto)
reading JSON samples ``{"seq": n, "temp": ...}`` from a file, one message per
line, at most ``--inflight`` unacknowledged at a time. The load tool is C so
that it is not what limits the rate on a 2-core machine.

1. **Ingest**: a ``konsul edge`` (durability "full": a PUBACK is sent once the
   sample is fsynced into the telemetry buffer) whose hub is down, so every
   sample stays in the buffer. Rate = samples / time from the first publish to
   the last acknowledgement (all ``mosquitto_pub`` exited, every sample counted
   in the edge's buffer).
2. **Forward**: a hub is then started where the edge expects it; rate = samples
   / time from the edge's reconnection to its buffer being empty (every batch
   stored at the hub, acknowledged, deleted at the edge), checked at the hub.
3. **Peer**: the same load against mosquitto (no subscriber, in-memory, no
   fsync: it only acknowledges), the ceiling of the load tool and the socket
   path; printed as a ratio for scale.

Goal (issue): sustained durable ingest >= 5,000 samples/s on this machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from http_kv import free_port  # noqa: E402
from mqtt import VENV_BIN, Broker, log, machine, start_mosquitto  # noqa: E402

DEVICES = 10
MANAGEMENT_TOKEN = "7c2e9a41-3b5d-4f6e-8a9b-1c2d3e4f5a6b"  # the edge runs with ACLs on; this token creates the devices


def start_edge(workdir: Path, hub_port: int, durability: str) -> Broker:
    edge = Broker(
        "konsul-edge",
        [str(VENV_BIN / "konsul"), "edge", "--acl", "off", "--site", "bench", "--data-dir", str(workdir / "edge-data"),
         "--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "",
         "--hub-url", f"http://127.0.0.1:{hub_port}", "--durability", durability,
         "--telemetry-buffer", "1GiB", "--acl-initial-management", MANAGEMENT_TOKEN],
        "http listening on",
        workdir,
    )
    text = edge.log_text
    edge.port = int(text.split("mqtt listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
    edge.http_url = text.split("http listening on ", 1)[1].split()[0]
    with httpx.Client(base_url=edge.http_url, timeout=30, headers={"X-Consul-Token": MANAGEMENT_TOKEN}) as http:
        for i in range(DEVICES):
            response = http.put(f"/v1/devices/sensor-{i}", json={"Type": "bench"})
            response.raise_for_status()
            edge.credentials[f"sensor-{i}"] = response.json()["Token"]
    return edge


def start_hub(workdir: Path, port: int) -> Broker:
    hub = Broker(
        "konsul-hub",
        [str(VENV_BIN / "konsul"), "hub", "--acl", "off", "--data-dir", str(workdir / "hub-data"), "--http-addr", f"127.0.0.1:{port}"],
        "http listening on",
        workdir,
    )
    hub.http_url = f"http://127.0.0.1:{port}"
    return hub


def sample_files(workdir: Path, per_device: int) -> list[Path]:
    files = []
    for i in range(DEVICES):
        path = workdir / f"samples-{i}.jsonl"
        with path.open("w") as out:
            for seq in range(per_device):
                out.write(json.dumps({"seq": seq, "temp": 20.0 + (seq % 50) / 10, "hum": 40 + seq % 7}) + "\n")
        files.append(path)
    return files


def publish_all(broker: Broker, files: list[Path], inflight: int) -> float:
    """Run the 10 devices to completion; returns the seconds it took."""
    procs = []
    start = time.monotonic()
    for i, path in enumerate(files):
        device = f"sensor-{i}"
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", device, "-q", "1",
                "-M", str(inflight), "-t", f"konsul/v1/devices/{device}/telemetry", "-l"]
        if device in broker.credentials:
            argv += ["-u", device, "-P", broker.credentials[device]]
        procs.append(subprocess.Popen(argv, stdin=path.open("rb"), stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed: {err.decode()}")
    return time.monotonic() - start


def status(edge: Broker) -> dict:
    return httpx.get(f"{edge.http_url}/v1/sync/status", timeout=30).json()["Telemetry"]


def connected(edge: Broker) -> bool:
    return httpx.get(f"{edge.http_url}/v1/sync/status", timeout=30).json()["Peers"][0]["Connected"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_once(per_device: int, inflight: int, durability: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    files = sample_files(workdir, per_device)
    total = per_device * DEVICES
    hub_port = free_port()
    edge = start_edge(workdir, hub_port, durability)
    hub = None
    try:
        cpu_before = edge.cpu_seconds()
        ingest_s = publish_all(edge, files, inflight)
        ingest_cpu = edge.cpu_seconds() - cpu_before
        got = status(edge)
        assert got["Buffered"] == total and got["Dropped"] == 0, got

        hub = start_hub(workdir, hub_port)
        # The edge retries with backoff; the forward rate counts from its reconnection.
        wait_for(lambda: connected(edge), 60, "the edge to reach the hub")
        start = time.monotonic()
        wait_for(lambda: status(edge)["Buffered"] == 0, 600, "the buffer to drain")
        forward_s = time.monotonic() - start
        stored = httpx.get(f"{hub.http_url}/v1/sync/status", timeout=30).json()["Telemetry"]["Stored"]
        assert stored == total, (stored, total)
        return {"ingest": total / ingest_s, "ingest_cpu_us": ingest_cpu / total * 1e6, "forward": total / forward_s}
    finally:
        edge.stop()
        if hub is not None:
            hub.stop()


def run_peer(per_device: int, inflight: int) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="bench-telemetry-peer-"))
    files = sample_files(workdir, per_device)
    broker = start_mosquitto(workdir)
    try:
        return per_device * DEVICES / publish_all(broker, files, inflight)
    finally:
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000, help="samples per device (default 10,000)")
    parser.add_argument("--inflight", type=int, default=20, help="QoS 1 messages in flight per device (default 20)")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--durability", default="full", choices=["full", "relaxed"])
    args = parser.parse_args()
    log(machine())
    runs = []
    peers = []
    for rep in range(args.reps):
        result = run_once(args.samples, args.inflight, args.durability)
        peer = run_peer(args.samples, args.inflight)
        log(f"run {rep + 1}: ingest {result['ingest']:,.0f}/s ({result['ingest_cpu_us']:.0f} us edge CPU/sample), "
            f"forward {result['forward']:,.0f}/s; mosquitto {peer:,.0f}/s")
        runs.append(result)
        peers.append(peer)
    ingest = statistics.median(r["ingest"] for r in runs)
    forward = statistics.median(r["forward"] for r in runs)
    cpu = statistics.median(r["ingest_cpu_us"] for r in runs)
    peer = statistics.median(peers)
    total = args.samples * DEVICES
    print(f"\n{DEVICES} devices x {args.samples:,} samples = {total:,}, QoS 1, {args.inflight} in flight each, "
          f"durability {args.durability}; median of {args.reps}")
    print("| figure | samples/s |")
    print("| --- | ---: |")
    print(f"| edge durable ingest (MQTT QoS 1 -> telemetry buffer) | {ingest:,.0f} ({cpu:.0f} us CPU/sample) |")
    print(f"| forward, edge buffer -> hub (stored, acknowledged, deleted) | {forward:,.0f} |")
    print(f"| mosquitto, same load (acknowledge only, no fsync) | {peer:,.0f} |")
    print(f"| edge ingest / mosquitto | {ingest / peer:.2f}x |")
    print(f"\ngoal: ingest >= 5,000 samples/s: {'met' if ingest >= 5000 else 'NOT met'}")
    log(machine())
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())

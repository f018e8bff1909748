"""What one held MQTT connection costs the edge: RSS with N idle devices connected against none.

Run it as ``.venv/bin/python bench/mqtt_connection_memory.py [N]`` (default
500). It starts ``konsul edge`` with the embedded broker on 127.0.0.1,
registers N devices over HTTP (so the records are in the baseline), connects
one device and lets it go (so lazily loaded code is in the baseline too), then
reads the edge's VmRSS; connects the N devices with their tokens (raw
sockets, keep-alive 600 s) and reads it again; subscribes each to its own
device topics and a KV filter and reads it a third time. The result is in
docs/mqtt.md, "What is refused, and how".
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agents import EdgeProcess  # noqa: E402

from konsul.protocols.mqtt import frames  # noqa: E402

SETTLE_S = 2.0  # for the edge to finish handling what was just sent, before reading RSS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect(host: str, port: int, device_id: str, token: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(frames.encode_connect(device_id, username=device_id, password=token, keepalive=600))
    if sock.recv(4) != b"\x20\x02\x00\x00":
        raise RuntimeError(f"{device_id} was not admitted")
    return sock


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with tempfile.TemporaryDirectory() as data:
        edge = EdgeProcess(Path(data) / "edge", extra=["--mqtt-addr", "127.0.0.1:0"])
        socks: list[socket.socket] = []
        try:
            host, port = edge.mqtt_addr()
            pid = edge.proc.pid
            with httpx.Client(base_url=edge.url, timeout=30) as http:
                tokens = [http.put(f"/v1/devices/m{i}", json={"Type": "sensor"}).json()["Token"] for i in range(count)]
            connect(host, port, "m0", tokens[0]).close()
            time.sleep(SETTLE_S)
            base = rss_kib(pid)
            socks = [connect(host, port, f"m{i}", tokens[i]) for i in range(count)]
            time.sleep(SETTLE_S)
            held = rss_kib(pid)
            for i, sock in enumerate(socks):
                sock.sendall(frames.encode_subscribe(1, [(f"konsul/v1/devices/m{i}/#", 1), ("konsul/v1/kv/cfg/#", 1)]))
            for sock in socks:
                sock.recv(100)
            time.sleep(SETTLE_S)
            subscribed = rss_kib(pid)
        finally:
            for sock in socks:
                sock.close()
            edge.stop()
    print(f"edge RSS: {base} KiB idle; {held} KiB with {count} connections "
          f"({(held - base) / count:.1f} KiB each); {subscribed} KiB subscribed ({(subscribed - base) / count:.1f} KiB each)")


if __name__ == "__main__":
    main()

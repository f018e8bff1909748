"""What one held MQTT connection costs the edge: RSS with N idle devices connected against none.

Run it as ``.venv/bin/python bench/mqtt_connection_memory.py [N] [--tls]``
(default 500; ``--tls``: the devices connect to the edge's MQTT over TLS
listener, certificates from trustme, TLS 1.3). It starts ``konsul edge`` with the embedded broker on 127.0.0.1,
registers N devices over HTTP (so the records are in the baseline), connects
one device and lets it go (so lazily loaded code is in the baseline too), then
reads the edge's VmRSS; connects the N devices with their tokens (raw
sockets, keep-alive 600 s) and reads it again; subscribes each to its own
device topics and a KV filter and reads it a third time. The result is in
docs/mqtt.md, "What is refused, and how" (and "MQTT over TLS" for ``--tls``).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agents import EdgeProcess  # noqa: E402

from konsul.protocols.mqtt import codec  # noqa: E402

SETTLE_S = 2.0  # for the edge to finish handling what was just sent, before reading RSS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect(host: str, port: int, device_id: str, token: str, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=host)
    sock.sendall(codec.encode_connect(device_id, username=device_id, password=token, keepalive=600))
    if sock.recv(4) != b"\x20\x02\x00\x00":
        raise RuntimeError(f"{device_id} was not admitted")
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", nargs="?", type=int, default=500, help="devices connected at once")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (the edge's --mqtts-addr listener)")
    args = parser.parse_args()
    count = args.count
    with tempfile.TemporaryDirectory() as data:
        context, extra, verify = None, ["--mqtt-addr", "127.0.0.1:0"], True
        if args.tls:
            import trustme

            authority = trustme.CA()
            issued = authority.issue_cert("127.0.0.1")
            cert, key = Path(data) / "cert.pem", Path(data) / "key.pem"
            issued.cert_chain_pems[0].write_to_path(str(cert))
            issued.private_key_pem.write_to_path(str(key))
            context = ssl.create_default_context()
            authority.configure_trust(context)
            verify = context  # the HTTP API may be served over TLS with the same certificate
            extra = ["--mqtt-addr", "", "--mqtts-addr", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)]
        edge = EdgeProcess(Path(data) / "edge", extra=extra)
        socks: list[socket.socket] = []
        try:
            host, port = edge.mqtts_addr() if args.tls else edge.mqtt_addr()
            pid = edge.proc.pid
            with httpx.Client(base_url=edge.url, timeout=30, verify=verify) as http:
                tokens = [http.put(f"/v1/devices/m{i}", json={"Type": "sensor"}).json()["Token"] for i in range(count)]
            connect(host, port, "m0", tokens[0], context).close()
            time.sleep(SETTLE_S)
            base = rss_kib(pid)
            socks = [connect(host, port, f"m{i}", tokens[i], context) for i in range(count)]
            time.sleep(SETTLE_S)
            held = rss_kib(pid)
            for i, sock in enumerate(socks):
                sock.sendall(codec.encode_subscribe(1, [(f"konsul/v1/devices/m{i}/#", 1), ("konsul/v1/kv/cfg/#", 1)]))
            for sock in socks:
                sock.recv(100)
            time.sleep(SETTLE_S)
            subscribed = rss_kib(pid)
        finally:
            for sock in socks:
                sock.close()
            edge.stop()
    print(f"{'TLS' if args.tls else 'plain'} edge RSS: {base} KiB idle; {held} KiB with {count} connections "
          f"({(held - base) / count:.1f} KiB each); {subscribed} KiB subscribed ({(subscribed - base) / count:.1f} KiB each)")


if __name__ == "__main__":
    main()

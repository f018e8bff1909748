"""DNS benchmark: ``konsul edge --dns-addr`` against dnsmasq serving the same records.

Run it on a Debian machine with dnsmasq-base and dnsperf installed (scripts/setup does)::

    .venv/bin/python bench/dns.py                  # --help for options

In one run, everything on 127.0.0.1 and on free ports:

1. ``dnsmasq`` (C, the records from a hosts file and ``--srv-host``, no
   upstream, no cache misses) -- first, so the load tool's own ceiling shows:
   if dnsperf drives dnsmasq far faster than the edge, it is not what limits
   the edge;
2. ``konsul edge`` with the same service registered (``web``, three healthy
   instances), answered from its catalog on every query (no answer cache), with
   ``--dns-rate-per-source 0`` (the per-source limit is for hostile clients;
   one benchmarking address would hit it).

Each is driven by dnsperf (UDP, ``-c`` clients in ``-T`` threads, at most
``-q`` queries outstanding) for ``--seconds``, with a query mix of A for
``web.service.consul`` and SRV for ``_web._tcp.service.consul``. It prints
queries/s, the share lost or answered with an error, the server's CPU
(100% = one core) and the ratio edge/dnsmasq.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
INSTANCES = [("10.0.0.5", 8080), ("10.0.0.6", 8081), ("10.0.0.7", 8082)]
QUERIES = "web.service.consul A\n_web._tcp.service.consul SRV\n"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answers(port: int, name: str = "web.service.consul") -> bool:
    result = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1", name],
                            capture_output=True, text=True)
    return result.returncode == 0 and "10.0.0.5" in result.stdout


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/dns.py: timed out waiting for {what}")
        time.sleep(0.1)


def dnsperf(port: int, queries: Path, args: argparse.Namespace, server_pid: int) -> dict:
    before = cpu_seconds(server_pid)
    started = time.monotonic()
    result = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(args.seconds),
         "-c", str(args.clients), "-T", str(args.threads), "-q", str(args.outstanding), "-t", "2"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(server_pid) - before) / elapsed * 100
    out = result.stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))
    noerror = int(re.search(r"NOERROR (\d+)", out).group(1)) if "NOERROR" in out else 0
    return {"qps": qps, "sent": sent, "lost": lost, "bad": sent - lost - noerror, "cpu": cpu}


def run_dnsmasq(work: Path, port: int) -> subprocess.Popen:
    hosts = work / "hosts"
    hosts.write_text("".join(f"{ip} web.service.consul\n" for ip, _ in INSTANCES)
                     + "".join(f"{ip} {ip.replace('.', '-')}.addr.consul\n" for ip, _ in INSTANCES))
    srv = [f"--srv-host=_web._tcp.service.consul,{ip.replace('.', '-')}.addr.consul,{port_},1,1"
           for ip, port_ in INSTANCES]
    return subprocess.Popen(
        ["dnsmasq", "-k", "-C", "/dev/null", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
         "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--pid-file=", "--user=root", "--local-ttl=0",
         "--dns-forward-max=1000", *srv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def run_edge(work: Path, port: int) -> tuple[subprocess.Popen, str]:
    log = open(work / "edge.log", "w")
    edge = subprocess.Popen(
        [sys.executable, "-m", "konsul.cli", "edge", "--site", "s1", "--node", "n1", "--data-dir",
         str(work / "edge"), "--http-addr", "127.0.0.1:0", "--mqtt-addr", "", "--coap-addr", "", "--acl", "off",
         "--dns-addr", f"127.0.0.1:{port}", "--dns-rate-per-source", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    return edge, str(work / "edge.log")


def edge_url(log_path: str) -> str:
    found = re.search(r"http listening on (http://\S+)", Path(log_path).read_text())
    return found.group(1) if found else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="dnsperf run time per server")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf clients (sockets)")
    parser.add_argument("--threads", type=int, default=2, help="dnsperf threads")
    parser.add_argument("--outstanding", type=int, default=200, help="queries in flight at most")
    args = parser.parse_args()
    for tool in ("dnsmasq", "dnsperf", "dig"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/dns.py needs {tool}: apt-get install dnsmasq-base dnsperf dnsutils")
    results = {}
    with tempfile.TemporaryDirectory(prefix="konsul-dns-bench-") as tmp:
        work = Path(tmp)
        queries = work / "queries"
        queries.write_text(QUERIES)

        port = free_port()
        dnsmasq = run_dnsmasq(work, port)
        try:
            wait_until(lambda: answers(port), "dnsmasq")
            results["dnsmasq"] = dnsperf(port, queries, args, dnsmasq.pid)
        finally:
            dnsmasq.terminate()
            dnsmasq.wait(10)

        port = free_port()
        edge, log_path = run_edge(work, port)
        try:
            wait_until(lambda: edge_url(log_path), "the edge's HTTP API")
            url = edge_url(log_path)
            for n, (ip, service_port) in enumerate(INSTANCES):
                httpx.put(f"{url}/v1/agent/service/register", timeout=10, json={
                    "Name": "web", "ID": f"web-{n}", "Port": service_port, "Address": ip,
                }).raise_for_status()
            wait_until(lambda: answers(port), "the edge's DNS")
            results["konsul edge"] = dnsperf(port, queries, args, edge.pid)
        finally:
            edge.terminate()
            edge.wait(20)

    print(f"# bench/dns.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"# dnsperf -c {args.clients} -T {args.threads} -q {args.outstanding} -l {args.seconds}, "
          "UDP, queries: A web.service.consul, SRV _web._tcp.service.consul")
    print(f"{'server':<14}{'queries/s':>12}{'lost':>9}{'errors':>9}{'server CPU':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['qps']:>12,.0f}{r['lost'] / max(1, r['sent']):>9.2%}"
              f"{r['bad'] / max(1, r['sent']):>9.2%}{r['cpu']:>11.0f}%")
    print(f"ratio konsul edge / dnsmasq: {results['konsul edge']['qps'] / results['dnsmasq']['qps']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An idle edge's memory and start-up: start `konsul edge --acl off` a few times on fresh data dirs.

    .venv/bin/python bench/edge_start.py                       # this checkout, MQTT and CoAP off
    .venv/bin/python bench/edge_start.py --protocols all       # with MQTT and CoAP on free ports
    .venv/bin/python bench/edge_start.py --python ../other/.venv/bin/python   # another checkout

For each start: the wall time from spawn to the first 200 from ``GET
/health/ready``, the CPU time the process used by then, and its VmRSS one
second after ready (idle). Prints each figure and the medians. Everything on
127.0.0.1, free ports, no DNS; the processes and temp dirs are removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from coap import cli_module  # bench/coap.py: the `konsul` module of any checkout


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)) / 1024


def ready(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False


def start_once(python: str, protocols: str, root: str) -> tuple[float, float, float]:
    """``(seconds to ready, CPU seconds to ready, VmRSS MiB 1 s later)`` of one start."""
    port = free_port()
    args = [python, "-m", cli_module(python), "edge", "--site", "s1", "--data-dir", tempfile.mkdtemp(dir=root),
            "--http-addr", f"127.0.0.1:{port}", "--acl", "off", "--dns-addr", ""]
    if protocols == "all":
        args += ["--mqtt-addr", f"127.0.0.1:{free_port()}", "--coap-addr", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"]
    else:
        args += ["--mqtt-addr", "", "--coap-addr", ""]
    began = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    try:
        while not ready(port):
            if process.poll() is not None:
                sys.exit(f"the edge exited with {process.returncode}: {' '.join(args)}")
            time.sleep(0.005)
        took, cpu = time.monotonic() - began, cpu_seconds(process.pid)
        time.sleep(1.0)
        return took, cpu, rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the checkout to measure")
    parser.add_argument("--protocols", choices=["http", "all"], default="http",
                        help="http: --mqtt-addr '' --coap-addr '' (default); all: MQTT and CoAP on too")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="edge-start-")
    try:
        runs = [start_once(args.python, args.protocols, root) for _ in range(args.starts)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, index, unit in (("ready", 0, "s"), ("CPU to ready", 1, "s"), ("VmRSS idle", 2, "MiB")):
        values = [run[index] for run in runs]
        print(f"{name}: median {statistics.median(values):.2f} {unit} ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()

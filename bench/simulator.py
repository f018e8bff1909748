"""Fleet simulator footprint: `konsul sim` holding N devices against a real `konsul edge`.

Run it as ``.venv/bin/python bench/simulator.py`` (``--help`` for options).
It starts a standalone ``konsul edge`` (default durability "full", devices
with tokens unless ``--anonymous``) on free ports on 127.0.0.1, then
``konsul sim --devices N``, waits until every device is connected, and
measures over ``--window`` seconds: the simulator's and the edge's CPU time
(``/proc/<pid>/stat`` utime + stime, as a share of one core), their resident
memory (VmRSS, VmHWM), and the samples the edge acknowledged per second.
Both processes share the machine, so on 2 cores the edge's speed bounds the
sample rate the fleet reaches.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUMMARY = re.compile(r"sim: (\d+)/(\d+) connected .* samples (\d+) sent / (\d+) acked")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


class Lines:
    """A child's output lines, collected by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float, accept=lambda m: True) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in reversed(self.lines):
                found = pattern.search(line)
                if found and accept(found):
                    return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit(f"no {pattern.pattern!r} in time:\n{''.join(self.lines[-20:])}")


def start(args: list[str]) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(
        [str(VENV_BIN / "konsul"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, Lines(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--protocol", default="mixed", choices=["mqtt", "coap", "mixed"])
    parser.add_argument("--rate", type=float, default=1.0, help="samples per second per device")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured once all are connected")
    parser.add_argument("--anonymous", action="store_true")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="konsul-bench-sim-") as data:
        edge_args = ["edge", "--acl", "off", "--site", "bench", "--data-dir", data, "--http-addr", "127.0.0.1:0",
                     "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "127.0.0.1:0"]
        edge, edge_out = start(edge_args + (["--allow-anonymous"] if options.anonymous else []))
        sim = None
        try:
            mqtt = edge_out.wait_for(re.compile(r"mqtt listening on (\S+)"), 30).group(1)
            coap = edge_out.wait_for(re.compile(r"coap listening on (\S+)"), 30).group(1)
            http = edge_out.wait_for(re.compile(r"http listening on http://(\S+)"), 30).group(1)
            sim, sim_out = start(
                ["sim", "--devices", str(options.devices), "--protocol", options.protocol, "--rate", str(options.rate),
                 "--http-addr", http, "--mqtt-addr", mqtt, "--coap-addr", coap, "--report-every", "1", "--seed", "1"]
                + (["--anonymous"] if options.anonymous else [])
            )
            began = time.monotonic()
            sim_out.wait_for(SUMMARY, 600, accept=lambda m: m.group(1) == m.group(2) == str(options.devices))
            ramp = time.monotonic() - began
            first = sim_out.wait_for(SUMMARY, 10)
            cpu0 = {name: cpu_seconds(p.pid) for name, p in (("sim", sim), ("edge", edge))}
            t0 = time.monotonic()
            time.sleep(options.window)
            cpu1 = {name: cpu_seconds(p.pid) for name, p in (("sim", sim), ("edge", edge))}
            elapsed = time.monotonic() - t0
            last = sim_out.wait_for(SUMMARY, 10)
            memory = {name: memory_kib(p.pid) for name, p in (("sim", sim), ("edge", edge))}
        finally:
            for proc in (sim, edge):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)

    acked = (int(last.group(4)) - int(first.group(4))) / elapsed
    offered = options.devices * options.rate
    print(f"{options.devices} devices ({options.protocol}, {'anonymous' if options.anonymous else 'tokens'}), "
          f"{options.rate:g} samples/s each (offered {offered:g}/s); all connected after {ramp:.0f} s")
    print(f"over {elapsed:.0f} s: {acked:.0f} samples/s acknowledged; last: {last.group(0)}")
    print("| process | CPU (% of one core) | VmRSS MiB | VmHWM MiB |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("sim", "edge"):
        share = 100 * (cpu1[name] - cpu0[name]) / elapsed
        print(f"| konsul {name} | {share:.0f} | {memory[name]['VmRSS'] / 1024:.0f} | {memory[name]['VmHWM'] / 1024:.0f} |")


if __name__ == "__main__":
    main()

"""HTTP KV PUT over TLS vs plain HTTP: ``konsul edge`` and etcd, each served both ways, in one run.

Run it as root on a Debian machine (like bench/http_kv.py, whose servers, load
generator and wrk script it uses, it installs ``wrk`` and ``etcd-server`` with
apt-get if they are missing)::

    .venv/bin/python bench/http_tls.py            # --help for options

In one run, everything on 127.0.0.1 and free ports:

1. Makes a CA and a server certificate for 127.0.0.1 the way ``konsul dev``
   does (protocols/tls_certs.py: ECDSA P-256) in the run's temp dir.
2. For each target, a fresh server: ``konsul`` (plain HTTP) and ``konsul-tls``
   (the same edge with ``--tls-cert --tls-key``), both as deployed, ACLs on, a
   management token on every request; ``etcd`` and ``etcd-tls`` (the same
   single-node etcd with ``--cert-file --key-file`` on an https:// client URL).
   Each gets wrk (``bench/wrk/kv.lua``, one thread, keep-alive connections:
   one handshake per connection, then the records) PUTting a new key per
   request, ~100-byte values, with 1 and with 64 connections. Targets are
   rotated per round and the median of the rounds is reported.
3. Prints req/s, latency, bad responses and the server's CPU per request for
   each, the TLS/plain ratios of konsul and of etcd side by side, and what a
   full handshake costs the server: sequential new connections from this
   process (handshake, close) for a few seconds, the server's CPU per
   handshake (and the TLS version and cipher suite negotiated).

wrk does not verify certificates (the bench's own CA); the ready checks and
the handshake loop do.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import http_kv as kv

TARGETS = ("konsul", "konsul-tls", "etcd", "etcd-tls")


def start(target: str, root: Path, logs: Path, round_: int, certificates, context: ssl.SSLContext) -> kv.Server:
    data = root / f"{target}-data-{round_}"
    if target == "konsul":
        return kv.start_konsul(data, logs)
    if target == "konsul-tls":
        flags = ("--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key), "--mqtts-addr", "off")
        return kv.start_konsul(data, logs, extra=flags, context=context)
    if target == "etcd":
        return kv.start_etcd(data, logs)
    return kv.start_etcd(data, logs, tls=(certificates.cert, certificates.key), context=context)


def handshakes(server: kv.Server, seconds: float) -> dict:
    """Sequential full TLS handshakes for ``seconds``: how many per second, and the server's CPU for each."""
    count = 0
    cpu_before = server.cpu_seconds()
    began = time.perf_counter()
    negotiated = ("", "")
    while time.perf_counter() - began < seconds:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with server.context.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
                negotiated = (secured.version() or "", (secured.cipher() or ("",))[0])
                count += 1
    elapsed = time.perf_counter() - began
    cpu = server.cpu_seconds() - cpu_before
    return {"per_s": count / elapsed, "cpu_us": 1e6 * cpu / max(1, count), "version": negotiated[0],
            "cipher": negotiated[1], "count": count}


def bench_target(target: str, root: Path, logs: Path, args: argparse.Namespace, round_: int,
                 certificates, context: ssl.SSLContext) -> tuple[list[dict], dict | None]:
    server = start(target, root, logs, round_, certificates, context)
    # kv.lua's target: the request format (konsul's, with the token; or etcd's gateway).
    wrk_target = "konsul" if target.startswith("konsul") else "etcd"
    results = []
    handshake = None
    try:
        server.wait_ready()
        for connections in args.connections:
            kv.log(f"{target}: PUT, {connections} connections, {args.duration:g}s")
            result = kv.run_wrk(server, wrk_target, "put", f"put-r{round_}-c{connections}", 0, connections,
                                args.duration, args.threads, args.quiet_wait)
            results.append(dict(result, target=target))
        if server.context is not None and args.handshake_seconds > 0:
            kv.log(f"{target}: full TLS handshakes for {args.handshake_seconds:g}s")
            handshake = handshakes(server, args.handshake_seconds)
    finally:
        server.stop()
        shutil.rmtree(root / f"{target}-data-{round_}", ignore_errors=True)
    return results, handshake


def table(cells: list[dict], shakes: dict[str, list[dict]], args: argparse.Namespace) -> str:
    order = {target: i for i, target in enumerate(TARGETS)}
    lines = [
        "| target | conns | req/s | p50 ms | p99 ms | bad | server CPU | server CPU/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(cells, key=lambda c: (c["connections"], order[c["target"]])):
        spread = f" ({min(c['rps_all']):,.0f}-{max(c['rps_all']):,.0f})" if len(c["rps_all"]) > 1 else ""
        lines.append(
            f"| {c['target']} | {c['connections']} | {c['rps']:,.0f}{spread} | {c['p50_us'] / 1000:.2f} "
            f"| {c['p99_us'] / 1000:.2f} | {c['errors']} | {100 * c['server_cpu']:.0f}% | {c['cpu_us_per_req']:,.0f} µs |"
        )
    by = {(c["target"], c["connections"]): c for c in cells}
    lines += [
        "",
        "| conns | konsul plain | konsul TLS | konsul TLS/plain | etcd plain | etcd TLS | etcd TLS/plain |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.connections:
        row = [f"| {n} "]
        for name in ("konsul", "etcd"):
            plain, secure = by.get((name, n)), by.get((f"{name}-tls", n))
            if plain and secure:
                row.append(
                    f"| {plain['rps']:,.0f} ({plain['cpu_us_per_req']:,.0f} µs) "
                    f"| {secure['rps']:,.0f} ({secure['cpu_us_per_req']:,.0f} µs) "
                    f"| {secure['rps'] / plain['rps']:.2f}x req/s, "
                    f"{secure['cpu_us_per_req'] / plain['cpu_us_per_req']:.2f}x CPU/req "
                )
            else:
                row.append("| - | - | - ")
        lines.append("".join(row) + "|")
    if shakes:
        lines += ["", "| target | full handshakes/s (one client, sequential) | server CPU per handshake | negotiated |",
                  "|---|---:|---:|---|"]
        for target, runs in shakes.items():
            runs = sorted(runs, key=lambda r: r["cpu_us"])
            mid = runs[len(runs) // 2]
            lines.append(f"| {target} | {mid['per_s']:,.0f} | {mid['cpu_us']:,.0f} µs | {mid['version']} "
                         f"{mid['cipher']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", default="1,64", help="comma-separated connection counts (default 1,64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: 2-core machine)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat the whole workload, report the median (default 3)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--handshake-seconds", type=float, default=3.0,
                        help="seconds of sequential full handshakes per TLS target and round (0: none; default 3)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each wrk run wait up to this many seconds for the machine to be under 15%% "
                        "busy (0: don't wait; default 30)")
    parser.add_argument("--nice", type=int, default=None,
                        help="niceness added to the servers and wrk we start; default -10 as root, else 0")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (default: system temp)")
    args = parser.parse_args()
    args.connections = [int(c) for c in args.connections.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    kv.NICE = args.nice if args.nice is not None else (-10 if kv.os.geteuid() == 0 else 0)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    kv.ensure_tools()
    busy, hogs = kv.busy_elsewhere()
    quiet = f"CPU {busy:.0f}% busy before the run" + (": " + "; ".join(hogs) if hogs else "")
    kv.log(quiet)
    started = datetime.datetime.now(datetime.UTC)
    measured_code = kv.code_version()
    root = Path(tempfile.mkdtemp(prefix="konsul-tls-bench-", dir=args.dir))
    logs = root / "logs"
    logs.mkdir()
    try:
        from konsul.protocols.tls_certs import ensure_dev_certificates

        certificates = ensure_dev_certificates(root / "tls")
        context = ssl.create_default_context(cafile=str(certificates.ca))
        rounds, shakes = [], {}
        for round_ in range(args.rounds):
            results = []
            for target in targets[round_ % len(targets):] + targets[:round_ % len(targets)]:
                cells, handshake = bench_target(target, root, logs, args, round_, certificates, context)
                results += cells
                if handshake is not None:
                    shakes.setdefault(target, []).append(handshake)
            rounds.append(results)
        cells = kv.median_cells(rounds)

        print(f"\nHTTP KV PUT over TLS vs plain, {started:%Y-%m-%d %H:%M} UTC")
        print(f"command: {sys.executable} {' '.join(sys.argv)}")
        print(f"konsul code: {measured_code}")
        print(f"machine: {kv.machine()}")
        print(f"before the run: {quiet}")
        print(
            f"load: wrk {kv.wrk_version()} -t{args.threads}, keep-alive connections, {args.duration:g}s per run, "
            f"{args.rounds} round(s){' (median)' if args.rounds > 1 else ''}; a new key per PUT, "
            f"{kv.VALUE_BYTES}-byte values"
        )
        print(f"etcd: {kv.etcd_version()} single node, default settings, v3 JSON gateway; konsul: edge, ACLs on "
              "(a token on every request), --durability full, MQTT/CoAP off")
        print(f"certificate: ECDSA P-256, signed by a CA made for the run ({certificates.directory}); "
              f"{ssl.OPENSSL_VERSION} in this Python")
        print(f"priority: servers and wrk at niceness {kv.NICE:+d} (--nice)\n")
        print(table(cells, shakes, args))
        errors = sum(c["errors"] for c in cells)
        print(f"\nbad responses in total: {errors}")
        return 1 if errors else 0
    finally:
        for server in list(kv.LIVE):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

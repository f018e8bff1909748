"""HTTP KV benchmark: ``konsul edge`` against a single-node etcd, with one load tool.

Run it as root on a Debian machine (it installs ``wrk`` and ``etcd-server``
with apt-get if they are missing)::

    .venv/bin/python bench/http_kv.py            # --help for options

What it does, in one run, everything on 127.0.0.1 and on free ports:

1. Starts ``konsul edge`` (fresh data dir, default durability "full": every
   acknowledged write is on disk, SQLite synchronous=FULL with group commit)
   and drives it with wrk (``bench/wrk/kv.lua``):

   - PUT /v1/kv/<key> with a ~100-byte raw body, every request a new key;
   - GET /v1/kv/<key> of keys written beforehand (1,000 by default);

   each with 1 and with 64 connections for a fixed duration.
2. Starts a single-node etcd (Debian's ``etcd-server``, fresh data dir, default
   settings: every write fsynced before it is acknowledged) and runs the same
   workload through its v3 JSON gateway: POST /v3/kv/put {"key","value"} and
   POST /v3/kv/range {"key"} (base64 keys and values).
3. Prints req/s, latency percentiles, bad responses (anything not a 200, or a
   body that does not show success) and the server's CPU use for each
   (target, op, connections), and the ratio konsul/etcd.
4. Measures ``konsul edge`` with everything on (HTTP, MQTT and CoAP addresses
   set): start-up time from spawn to the first 200 from GET /health/ready (the
   median of ``--starts`` starts on fresh data dirs, and of starts on the data
   the benchmark wrote), and its resident memory (VmRSS) once ready and idle.

wrk runs with one thread (-t1): the machine this was written for has 2 cores,
and wrk and the server compete for them. As root, the servers and wrk run at
niceness -10 (--nice), so other work on a shared machine takes less from them,
and each run first waits (--quiet-wait) for the machine to calm down. Every server it starts is stopped and
every temp dir removed at the end, also on Ctrl-C.

``--floors`` also runs the 64-connection PUT workload against do-nothing HTTP
servers (``bench/http_floor.py``): what the HTTP layer alone costs.

``--profile`` additionally samples konsul with py-spy (installed into this
virtualenv with pip if missing) during an extra, unmeasured 64-connection PUT
run and prints where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import importlib.util
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LUA = BENCH_DIR / "wrk" / "kv.lua"
VENV_BIN = Path(sys.executable).parent
KONSUL = VENV_BIN / "konsul"
VALUE_BYTES = 100  # keep in step with bench/wrk/kv.lua
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- tools ---------------------------------------------------------------------------


def ensure_tools() -> None:
    """apt-get install wrk and etcd-server if either is missing (needs root)."""
    missing = [pkg for pkg, binary in (("wrk", "wrk"), ("etcd-server", "etcd")) if shutil.which(binary) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}: run as root, or apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # etcd-server's postinst starts a system-wide etcd where an init system
    # runs; policy-rc.d (exit 101) tells invoke-rc.d not to start services.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def ensure_py_spy() -> str:
    found = VENV_BIN / "py-spy"
    if not found.exists():
        log("installing py-spy into the virtualenv")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(found)


# -- processes -----------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0,
                 conn: http.client.HTTPConnection | None = None, headers: dict | None = None,
                 context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One request; over HTTPS with ``context`` (bench/http_tls.py's TLS targets)."""
    own = conn is None
    if own:
        if context is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = dict(headers or {})
        if body is not None and body[:1] == b"{":
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


class Server:
    """A server process we started; stopped by its pid only.

    ``context``: the server speaks HTTPS only, and this is how a client trusts it.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, port: int, ready_path: str,
                 env: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.port = port
        self.context = context
        self.scheme = "http" if context is None else "https"
        self.log_path = log_path
        self.ready_path = ready_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - open while the server runs, closed by stop()
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            prioritised(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True, env=env,
        )
        LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0, poll: float = 0.005) -> float:
        """Seconds from spawn until GET ready_path answered 200."""
        deadline = self.spawned + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = http_request(self.port, "GET", self.ready_path, timeout=1.0, context=self.context)
                if status == 200:
                    return time.perf_counter() - self.spawned
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(poll)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads

    def status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        LIVE.discard(self)


LIVE: set[Server] = set()
NICE = 0  # added to the niceness of every process we start (--nice)


def prioritised(argv: list[str]) -> list[str]:
    """``argv`` run at our chosen priority (--nice), it and every thread it starts.

    With the kernel's autogroup scheduling, niceness only ranks threads within
    one session's group: start the child in a session of its own
    (start_new_session) and give that group the niceness too.
    """
    if not NICE:
        return argv
    script = f'echo {NICE} > /proc/self/autogroup 2>/dev/null; exec nice -n {NICE} "$@"'
    return ["sh", "-c", script, "sh", *argv]


# The "konsul" target runs as deployed, ACLs on, every request with this
# management token; "konsul-noacl" runs with --acl off and sends none.
BENCH_TOKEN = "b3c4d5e6-0000-4000-8000-00000000beef"


# The "konsul-baseline" target: another checkout's konsul (--baseline-bin), for
# a before/after comparison in one run.
BASELINE: list[Path] = []


@functools.cache
def has_acls(konsul: Path = KONSUL) -> bool:
    usage = subprocess.run([str(konsul), "edge", "--help"], capture_output=True, text=True, check=False).stdout
    return "--acl " in usage


def is_konsul(target: str) -> bool:
    return target.startswith("konsul")


def token_for(target: str) -> str:
    return BENCH_TOKEN if target == "konsul" else ""


def start_konsul(data_dir: Path, logs: Path, everything: bool = False, acl: bool = True,
                 konsul: Path = KONSUL, extra: tuple[str, ...] = (), context: ssl.SSLContext | None = None) -> Server:
    """``extra``: more flags (``--tls-cert`` ...), with the ``context`` that trusts the edge's certificate."""
    port = free_port()
    argv = [str(konsul), "edge", "--site", "s1", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{port}",
            *extra]
    if has_acls(konsul):  # a baseline checkout from before ACLs takes neither flag
        argv += ["--acl-initial-management", BENCH_TOKEN] if acl else ["--acl", "off"]
    if everything:
        argv += [
            "--mqtt-addr", f"127.0.0.1:{free_port()}",
            "--coap-addr", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
            "--allow-anonymous",
        ]
    else:
        argv += ["--mqtt-addr", "", "--coap-addr", ""]
    # Python's bytecode cache, as an installed konsul has it, kept in our temp
    # dir (the environment may forbid writing it, PYTHONDONTWRITEBYTECODE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(logs.parent / "pycache")
    return Server("konsul edge", argv, logs / f"konsul-{port}.log", port, "/health/ready", env, context)


def start_etcd(data_dir: Path, logs: Path, tls: tuple[Path, Path] | None = None,
               context: ssl.SSLContext | None = None) -> Server:
    """``tls``: (certificate, key) to serve its clients over HTTPS, trusted through ``context``."""
    client, peer = free_port(), free_port()
    scheme = "http" if tls is None else "https"
    argv = [
        shutil.which("etcd") or "etcd",
        "--name", "bench",
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://127.0.0.1:{client}",
        "--advertise-client-urls", f"{scheme}://127.0.0.1:{client}",
        *(() if tls is None else ("--cert-file", str(tls[0]), "--key-file", str(tls[1]))),
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
        "--initial-cluster-state", "new",
        "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
    ]
    return Server("etcd", argv, logs / f"etcd-{client}.log", client, "/health", context=context)


def etcd_version() -> str:
    out = subprocess.run([shutil.which("etcd") or "etcd", "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("\n")[0].replace("etcd Version: ", "")


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).split("\n")[0].split(" [")[0].replace("wrk ", "")


# -- workload ------------------------------------------------------------------------


def value_of(prefix: str, n: int) -> bytes:
    head = f"{prefix}-{n:010d}-".encode()
    return head + b"." * (VALUE_BYTES - len(head))


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def preload(target: str, port: int, prefix: str, keys: int) -> None:
    """Write keys <prefix>/0 .. <prefix>/<keys-1> for the GET runs."""
    local = threading.local()

    def put(n: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        key, value = f"{prefix}/{n}", value_of(prefix, n)
        if is_konsul(target):
            headers = {"X-Consul-Token": token_for(target)} if token_for(target) else None
            status, body = http_request(port, "PUT", f"/v1/kv/{key}", value, conn=conn, headers=headers)
            ok = status == 200 and body == b"true"
        else:
            doc = json.dumps({"key": b64(key.encode()), "value": b64(value)}).encode()
            status, body = http_request(port, "POST", "/v3/kv/put", doc, conn=conn)
            ok = status == 200
        if not ok:
            raise RuntimeError(f"preloading {key} into {target}: {status} {body[:200]!r}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(keys)))


def wait_quiet(max_wait: float, limit: float = 15.0) -> float:
    """Wait up to ``max_wait`` s until the machine is under ``limit``% busy; the last busy %."""
    deadline = time.monotonic() + max_wait
    while True:
        before, wall = machine_busy_seconds(), time.monotonic()
        time.sleep(2.0)
        busy = 100 * (machine_busy_seconds() - before) / (time.monotonic() - wall) / (os.cpu_count() or 1)
        if busy < limit or time.monotonic() >= deadline:
            if busy >= limit:
                log(f"  machine still {busy:.0f}% busy after waiting {max_wait:g}s; running anyway")
            return busy
        log(f"  machine {busy:.0f}% busy (not ours): waiting for it to calm down")


def konsul_commit_counters(port: int, context: ssl.SSLContext | None = None) -> tuple[float, float] | None:
    """(commit rounds, batches) from konsul's /metrics, if it exports them."""
    try:
        status, body = http_request(port, "GET", "/metrics", headers={"X-Consul-Token": BENCH_TOKEN}, context=context)
    except OSError:
        return None
    values = {}
    for line in body.decode(errors="replace").splitlines():
        for name in ("konsul_store_commit_rounds", "konsul_store_batches"):
            if line.startswith((name + "_total ", name + " ")):
                values[name] = float(line.split()[-1])
    if status != 200 or len(values) != 2:
        return None
    return values["konsul_store_commit_rounds"], values["konsul_store_batches"]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


_RESULT = re.compile(r"(\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")


def run_wrk(server: Server, target: str, op: str, prefix: str, keys: int, connections: int,
            duration: float, threads: int, quiet_wait: float = 0) -> dict:
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(LUA), f"{server.scheme}://127.0.0.1:{server.port}", "--", target, op, prefix, str(keys),
        token_for(target),
    ]
    if quiet_wait:
        wait_quiet(quiet_wait)
    commits_before = konsul_commit_counters(server.port, server.context) if is_konsul(target) and op == "put" else None
    machine_before = machine_busy_seconds()
    cpu_before = server.cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(prioritised(argv), capture_output=True, text=True, check=False, start_new_session=True)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = server.cpu_seconds()
    machine_after = machine_busy_seconds()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict = {}
    for name, raw in _RESULT.findall(line):
        result[name] = json.loads(raw) if raw.startswith('"') else int(raw)
    seconds = result["duration_us"] / 1e6
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    socket_errors = sum(result[k] for k in ("connect", "read", "write", "timeout"))
    result.update(
        target=target, op=op, connections=connections,
        rps=result["requests"] / seconds,
        errors=result["bad"] + socket_errors,
        socket_errors=socket_errors,
        server_cpu=(cpu_after - cpu_before) / seconds,
        wrk_cpu=wrk_cpu / seconds,
    )
    result["cpu_us_per_req"] = 1e6 * (cpu_after - cpu_before) / max(1, result["requests"])
    if commits_before is not None:
        commits_after = konsul_commit_counters(server.port, server.context)
        if commits_after is not None:
            rounds, batches = (a - b for a, b in zip(commits_after, commits_before))
            result["writes_per_commit"] = batches / rounds if rounds else 0.0
    result["other_cpu"] = max(0.0, (machine_after - machine_before) / seconds - result["server_cpu"] - result["wrk_cpu"])
    if result["errors"]:
        log(f"  {target} {op} c{connections}: {result['errors']} errors, e.g. {result['sample']}")
    return result


def bench_target(target: str, root: Path, logs: Path, args: argparse.Namespace, round_: int) -> list[dict]:
    data = root / f"{target}-data-{round_}"
    if target == "konsul-baseline":
        server = start_konsul(data, logs, acl=False, konsul=BASELINE[0] / "konsul")
    elif is_konsul(target):
        server = start_konsul(data, logs, acl=target == "konsul")
    else:
        server = start_etcd(data, logs)
    results = []
    try:
        server.wait_ready()
        for connections in args.connections:
            log(f"{target}: PUT, {connections} connections, {args.duration:g}s")
            results.append(run_wrk(server, target, "put", f"put-r{round_}-c{connections}", 0,
                                   connections, args.duration, args.threads, args.quiet_wait))
        log(f"{target}: preloading {args.keys} keys for the GETs")
        preload(target, server.port, f"get-r{round_}", args.keys)
        for connections in args.connections:
            log(f"{target}: GET, {connections} connections, {args.duration:g}s")
            results.append(run_wrk(server, target, "get", f"get-r{round_}", args.keys,
                                   connections, args.duration, args.threads, args.quiet_wait))
        if is_konsul(target):
            time.sleep(1.0)
            rss = server.status_kb("VmRSS")
            for r in results:
                r["rss_after_kb"] = rss
            if args.profile and round_ == 0:
                profile(server, args, root)
    finally:
        server.stop()
    if is_konsul(target):
        written = sum(r["requests"] for r in results if r["op"] == "put") + args.keys
        for r in results:
            r["data_dir"], r["keys_written"] = str(data), written
    return results


def floors(root: Path, logs: Path, args: argparse.Namespace) -> list[dict]:
    """PUT at the highest connection count against bench/http_floor.py's do-nothing servers."""
    connections = max(args.connections)
    results = []
    for variant in FLOOR_VARIANTS:
        if "quart" in variant and importlib.util.find_spec("quart_trio") is None:
            continue  # quart-trio is no longer konsul's; `pip install quart-trio` to compare with it
        port = free_port()
        server = Server(f"floor {variant}", [sys.executable, str(BENCH_DIR / "http_floor.py"), variant, str(port)],
                        logs / f"floor-{variant}.log", port, "/ready")
        try:
            server.wait_ready()
            runs = []
            for round_ in range(args.rounds):
                log(f"floor {variant}: PUT, {connections} connections, {args.duration:g}s")
                runs.append(run_wrk(server, "konsul", "put", f"floor-{round_}", 0, connections,
                                    args.duration, args.threads, args.quiet_wait))
        finally:
            server.stop()
        runs.sort(key=lambda r: r["rps"])
        cell = dict(runs[len(runs) // 2], variant=variant, rps_all=[r["rps"] for r in runs])
        cell["errors"] = sum(r["errors"] for r in runs)
        results.append(cell)
    return results


FLOOR_VARIANTS = {
    "raw": "hand-written HTTP/1.1 reader on trio streams",
    "h11": "h11 on trio streams, no ASGI",
    "asgi": "hypercorn (trio worker) + bare ASGI app",
    "quart": "hypercorn (trio worker) + quart-trio, one route (konsul's HTTP stack before the lean adapter)",
    "lean": "hypercorn's protocol core on konsul's trio adapter + bare ASGI app",
    "lean-quart": "hypercorn's protocol core on konsul's trio adapter + quart-trio, one route",
}


def floors_table(results: list[dict], konsul: dict | None) -> str:
    lines = [
        "| server (answers every PUT with `true`, does nothing else) | req/s | server CPU/req | p50 ms | bad |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['variant']}: {FLOOR_VARIANTS[r['variant']]} | {r['rps']:,.0f} | {r['cpu_us_per_req']:,.0f} µs "
                     f"| {r['p50_us'] / 1000:.2f} | {r['errors']} |")
    if konsul:
        lines.append(f"| konsul edge, the real PUT (from the table above) | {konsul['rps']:,.0f} "
                     f"| {konsul['cpu_us_per_req']:,.0f} µs | {konsul['p50_us'] / 1000:.2f} | {konsul['errors']} |")
    return "\n".join(lines)


# -- start-up and memory ---------------------------------------------------------------


def listening(port: int, udp: bool = False) -> bool:
    """Whether something listens on ``port`` (TCP LISTEN, or a bound UDP socket), IPv4 or IPv6."""
    kind = "udp" if udp else "tcp"
    for table in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and (udp or fields[3] == "0A"):
                return True
    return False


def startup(root: Path, logs: Path, starts: int, data_dir: Path | None = None, quiet_wait: float = 0,
            everything: bool = True) -> dict:
    """Median start-up time and idle memory of ``starts`` starts."""
    times, rss, hwm, parts = [], [], [], {}
    for i in range(starts):
        if quiet_wait:
            wait_quiet(quiet_wait)
        target_dir = data_dir or root / f"startup-{i}"
        server = start_konsul(target_dir, logs, everything=everything)
        try:
            times.append(server.wait_ready())
            time.sleep(args_idle)
            rss.append(server.status_kb("VmRSS"))
            hwm.append(server.status_kb("VmHWM"))
            argv = server.proc.args
            if everything:
                mqtt = int(argv[argv.index("--mqtt-addr") + 1].rsplit(":", 1)[1])
                coap = int(argv[argv.index("--coap-addr") + 1].rsplit(":", 1)[1])
                parts = {"mqtt": listening(mqtt), "coap": listening(coap, udp=True)}
        finally:
            server.stop()
        if data_dir is None:
            shutil.rmtree(target_dir, ignore_errors=True)
    return {
        "startup_s": statistics.median(times),
        "startup_all_s": times,
        "rss_kb": statistics.median(rss),
        "hwm_kb": statistics.median(hwm),
        "listening": parts,
        "everything": everything,
    }


def startups(root: Path, logs: Path, starts: int, everything: bool, **kwargs) -> dict:
    """startup() with everything on; if the edge cannot start so, say why and measure HTTP only."""
    if everything:
        try:
            return startup(root, logs, starts, everything=True, **kwargs)
        except RuntimeError as error:
            lines = [line.strip(" |") for line in str(error).splitlines()]
            errors = [line for line in lines if re.match(r"\w+(Error|Exception)\b", line)]
            reason = (errors or [line for line in lines if line] or ["?"])[-1]
            log(f"konsul edge does not start with MQTT and CoAP on ({reason}); measuring it with them off")
            result = startup(root, logs, starts, everything=False, **kwargs)
            result["everything_failed"] = reason
            return result
    return startup(root, logs, starts, everything=False, **kwargs)


args_idle = 1.0


# -- profile ---------------------------------------------------------------------------


CATEGORIES = [
    ("h11 (HTTP/1.1 parsing and serialising)", ("h11/",)),
    ("hypercorn (server, ASGI glue)", ("hypercorn/",)),
    ("quart / quart_trio (request, response, contexts, dispatch)", ("quart/", "quart_trio/")),
    ("werkzeug (routing, headers, datastructures)", ("werkzeug/",)),
    ("trio (scheduler, sockets, threads)", ("trio/", "outcome/", "sniffio/")),
    ("konsul HTTP layer (protocols/http/)", ("protocols/http/",)),
    ("konsul state and store (sync/)", ("sync/",)),
    ("pycrdt", ("pycrdt/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("json", ("json/",)),
]


def categorise(frame: str) -> str:
    """The library of a py-spy frame, ``function (path/file.py:line)``."""
    where = frame.rpartition(" (")[2]
    for name, prefixes in CATEGORIES:
        if where.startswith(prefixes):
            return name
    return "other (stdlib, attrs-generated, ...)"


def profile(server: Server, args: argparse.Namespace, root: Path) -> None:
    py_spy = ensure_py_spy()
    out = root / "profile.txt"
    seconds = max(5, int(args.duration))
    log(f"konsul: profiling PUT at 64 connections with py-spy for {seconds}s (not measured)")
    wrk = subprocess.Popen(prioritised(
        ["wrk", f"-t{args.threads}", "-c64", f"-d{seconds + 2}s", "--timeout", "10s", "-s", str(LUA),
         f"http://127.0.0.1:{server.port}", "--", "konsul", "put", "profile", "0", BENCH_TOKEN]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        time.sleep(1)
        subprocess.run(
            [py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds), "--rate", "200",
             "--format", "raw", "--threads", "--function", "--nonblocking", "-o", str(out)],
            check=True, capture_output=True,
        )
    finally:
        wrk.wait()
    report = summarise_profile(out.read_text())
    print(report)
    if args.profile_out:
        Path(args.profile_out).write_text(out.read_text())
        log(f"raw py-spy samples written to {args.profile_out}")


OWNERS = [
    ("konsul state and store (sync/)", ("sync/",)),
    ("konsul HTTP routes (protocols/http/)", ("protocols/http/",)),
    ("pycrdt", ("pycrdt/",)),
    ("json", ("json/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("werkzeug", ("werkzeug/",)),
    ("quart / quart_trio", ("quart/", "quart_trio/")),
    ("h11", ("h11/",)),
    ("hypercorn", ("hypercorn/",)),
]


def owner_of(frames: list[str]) -> str:
    """Who a sample's time is spent for: the innermost frame of a named library.

    trio and stdlib frames count for the library that called them (hypercorn
    taking a trio lock is hypercorn's cost); a stack with no such frame is the
    trio scheduler and event loop itself.
    """
    for frame in reversed(frames):
        where = frame.rpartition(" (")[2]
        for name, prefixes in OWNERS:
            if where.startswith(prefixes):
                return name
    return "trio scheduler and event loop (no library frame on the stack)"


def summarise_profile(raw: str, top: int = 25) -> str:
    """Self and inclusive time per function and per library from py-spy's raw (collapsed) output."""
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    cat_self: collections.Counter = collections.Counter()
    cat_incl: collections.Counter = collections.Counter()
    per_thread: collections.Counter = collections.Counter()
    owners: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        per_thread[thread] += n
        total += n
        if not frames:
            continue
        if "MainThread" in thread:
            owners[owner_of(frames)] += n
        else:
            owners[f"other threads ({thread.split(': ', 1)[-1].rstrip(')')}: the SQLite commit)"] += n
        leaf = frames[-1]
        self_time[leaf] += n
        cat_self[categorise(leaf)] += n
        for frame in set(frames):
            inclusive[frame] += n
        for cat in {categorise(f) for f in frames}:
            cat_incl[cat] += n
    if not total:
        return "profile: no samples"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"\n### py-spy: konsul edge, PUT, 64 connections ({total} samples, all threads, idle excluded)\n"]
    lines.append("samples by thread:")
    lines += [f"  {pct(n)}  {t}" for t, n in per_thread.most_common()]
    lines.append("\nwho the time is spent for (innermost library frame; trio/stdlib count for their caller):")
    lines += [f"  {pct(n)}  {o}" for o, n in owners.most_common()]
    lines.append("\nby library (self = leaf frame there; inclusive = anywhere on the stack):")
    lines += [f"  self {pct(cat_self[c])}  incl {pct(cat_incl[c])}  {c}"
              for c, _ in sorted(cat_incl.items(), key=lambda kv: -cat_self[kv[0]])]
    lines.append(f"\ntop {top} functions by self time:")
    lines += [f"  {pct(n)}  {f}" for f, n in self_time.most_common(top)]
    lines.append(f"\ntop {top} functions by inclusive time:")
    lines += [f"  {pct(n)}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------


def busy_elsewhere(seconds: float = 2.0) -> tuple[float, list[str]]:
    """CPU busy (% of all cores) over ``seconds`` and the other processes using it.

    The numbers mean little if something else loads the machine: they are
    printed with the results.
    """
    def stat() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def per_process() -> dict[int, tuple[str, int]]:
        out = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                raw = (proc / "stat").read_text()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            fields = raw.rsplit(")", 1)[1].split()
            out[int(proc.name)] = (cmd or raw.split("(", 1)[1].split(")")[0], int(fields[11]) + int(fields[12]))
        return out

    total0, idle0 = stat()
    procs0 = per_process()
    time.sleep(seconds)
    total1, idle1 = stat()
    procs1 = per_process()
    busy = 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))
    hogs = []
    for pid, (cmd, ticks) in procs1.items():
        if pid == os.getpid() or pid not in procs0:
            continue
        share = 100.0 * (ticks - procs0[pid][1]) / CLK_TCK / seconds
        if share >= 5:
            hogs.append(f"{share:.0f}% {cmd[:100]}")
    return busy, hogs


def code_version() -> str:
    """The konsul commit measured, and whether the work tree differs from it."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def machine() -> str:
    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout.rstrip()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size", tempfile.gettempdir()],
                          capture_output=True, text=True, check=False).stdout.splitlines()[-1]
    return (
        f"nproc {os.cpu_count()} ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"temp dirs on {' '.join(disk.split())}\n`free -g`:\n{free}"
    )


def median_cells(rounds: list[list[dict]]) -> list[dict]:
    cells: dict[tuple, list[dict]] = collections.defaultdict(list)
    for results in rounds:
        for r in results:
            cells[(r["target"], r["op"], r["connections"])].append(r)
    out = []
    for runs in cells.values():
        runs = sorted(runs, key=lambda r: r["rps"])
        cell = dict(runs[len(runs) // 2])
        cell["rps_all"] = [r["rps"] for r in runs]
        cell["errors"] = sum(r["errors"] for r in runs)
        out.append(cell)
    return out


def table(cells: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| target | op | conns | req/s | p50 ms | p99 ms | bad responses | server CPU | server CPU/req | wrk CPU | other CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(cells, key=lambda c: (c["op"] != "put", c["connections"], c["target"] != "konsul")):
        spread = ""
        if len(c["rps_all"]) > 1:
            spread = f" ({min(c['rps_all']):,.0f}-{max(c['rps_all']):,.0f})"
        lines.append(
            f"| {c['target']} | {c['op'].upper()} | {c['connections']} | {c['rps']:,.0f}{spread} "
            f"| {c['p50_us'] / 1000:.2f} | {c['p99_us'] / 1000:.2f} | {c['errors']} "
            f"| {100 * c['server_cpu']:.0f}% | {c['cpu_us_per_req']:,.0f} µs | {100 * c['wrk_cpu']:.0f}% | {100 * c['other_cpu']:.0f}% |"
        )
    by = {(c["target"], c["op"], c["connections"]): c for c in cells}
    lines += ["", "| op | conns | konsul req/s | etcd req/s | konsul/etcd |", "|---|---:|---:|---:|---:|"]
    for op in ("put", "get"):
        for n in args.connections:
            k, e = by.get(("konsul", op, n)), by.get(("etcd", op, n))
            if k and e:
                goal = " (goal >= 0.5x)" if op == "put" and n == 64 else ""
                lines.append(f"| {op.upper()} | {n} | {k['rps']:,.0f} | {e['rps']:,.0f} | {k['rps'] / e['rps']:.2f}x{goal} |")
    if any(c["target"] == "konsul-baseline" for c in cells):
        lines += ["", "| op | conns | this checkout, --acl off (req/s) | baseline (req/s) | this/baseline |",
                  "|---|---:|---:|---:|---:|"]
        for op in ("put", "get"):
            for n in args.connections:
                k, b = by.get(("konsul-noacl", op, n)), by.get(("konsul-baseline", op, n))
                if k and b:
                    lines.append(f"| {op.upper()} | {n} | {k['rps']:,.0f} ({k['cpu_us_per_req']:,.0f} µs CPU) "
                                 f"| {b['rps']:,.0f} ({b['cpu_us_per_req']:,.0f} µs CPU) | {k['rps'] / b['rps']:.2f}x |")
    if any(c["target"] == "konsul-noacl" for c in cells):
        lines += ["", "| op | conns | ACLs on, token on every request (req/s) | --acl off (req/s) | on/off |",
                  "|---|---:|---:|---:|---:|"]
        for op in ("put", "get"):
            for n in args.connections:
                k, o = by.get(("konsul", op, n)), by.get(("konsul-noacl", op, n))
                if k and o:
                    lines.append(f"| {op.upper()} | {n} | {k['rps']:,.0f} | {o['rps']:,.0f} "
                                 f"| {k['rps'] / o['rps']:.2f}x (goal >= 0.90x) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", default="1,64", help="comma-separated connection counts (default 1,64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: 2-core machine)")
    parser.add_argument("--keys", type=int, default=1000, help="keys preloaded for the GETs (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat the whole workload, report the median (default 3)")
    parser.add_argument("--starts", type=int, default=5, help="konsul starts for the start-up median (default 5)")
    parser.add_argument("--targets", default="konsul,etcd",
                        help="comma-separated: konsul (ACLs on, a token on every request), konsul-noacl (--acl off), "
                        "konsul-baseline (--baseline-bin's konsul, ACLs off if it has them), etcd")
    parser.add_argument("--baseline-bin", help="the bin directory of another checkout's virtualenv (the konsul-baseline target)")
    parser.add_argument("--floors", action="store_true",
                        help="also run the PUT workload at the highest connection count against do-nothing "
                        "HTTP servers (bench/http_floor.py): what the HTTP layer alone costs")
    parser.add_argument("--profile", action="store_true", help="also sample konsul with py-spy during PUT c64")
    parser.add_argument("--profile-out", help="keep py-spy's raw samples in this file")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each wrk run wait up to this many seconds for the machine to be "
                        "under 15%% busy (0: don't wait; default 30)")
    parser.add_argument("--nice", type=int, default=None,
                        help="niceness added to the servers and wrk we start; default -10 as root (they then "
                        "win the CPU over other work on the machine, so the figures measure konsul and etcd), "
                        "else 0")
    parser.add_argument("--json", help="write all results to this file as JSON")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (default: system temp)")
    args = parser.parse_args()
    args.connections = [int(c) for c in args.connections.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if "konsul-baseline" in targets:
        if not args.baseline_bin or not (Path(args.baseline_bin) / "konsul").exists():
            sys.exit("konsul-baseline needs --baseline-bin DIR, the bin directory holding that checkout's konsul")
        BASELINE.append(Path(args.baseline_bin))
    global NICE
    NICE = args.nice if args.nice is not None else (-10 if os.geteuid() == 0 else 0)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    ensure_tools()
    busy, hogs = busy_elsewhere()
    quiet = f"CPU {busy:.0f}% busy before the run" + (": " + "; ".join(hogs) if hogs else "")
    log(quiet)
    if busy > 10:
        log("WARNING: the machine is not idle; the figures will be low and noisy")
    started = datetime.datetime.now(datetime.UTC)
    measured_code = code_version()
    root = Path(tempfile.mkdtemp(prefix="konsul-http-bench-", dir=args.dir))
    logs = root / "logs"
    logs.mkdir()
    try:
        first_start_s, everything_failed = None, None
        if "konsul" in targets:
            # The first start compiles every module into the bytecode cache; it
            # is reported on its own, the start-up figures are warm.
            log("konsul: first start (fills the bytecode cache)")
            if args.quiet_wait:
                wait_quiet(args.quiet_wait)
            first = startups(root, logs, 1, everything=True)
            first_start_s, everything = first["startup_s"], first["everything"]
            everything_failed = first.get("everything_failed")
        rounds = []
        for round_ in range(args.rounds):
            results = []
            # Each round starts with another target: the first of a round
            # measured slower (a cold page cache, CPU frequency), which would
            # otherwise always fall on the same one.
            for target in targets[round_ % len(targets):] + targets[:round_ % len(targets)]:
                results += bench_target(target, root, logs, args, round_)
            rounds.append(results)
        cells = median_cells(rounds)
        floor_results = floors(root, logs, args) if args.floors else []
        extra = {}
        if "konsul" in targets:
            log(f"konsul: {args.starts} starts on fresh data dirs, everything on")
            extra["first"] = first_start_s
            extra["fresh"] = startups(root, logs, args.starts, everything, quiet_wait=args.quiet_wait)
            data = Path(next(c for c in cells if c["target"] == "konsul")["data_dir"])
            keys_written = next(c for c in cells if c["target"] == "konsul")["keys_written"]
            log(f"konsul: {min(3, args.starts)} starts on the benchmark's data ({keys_written:,} keys)")
            extra["loaded"] = startups(root, logs, min(3, args.starts), everything, data_dir=data,
                                       quiet_wait=args.quiet_wait)
            extra["loaded"]["keys"] = keys_written
            extra["loaded"]["db_bytes"] = sum(p.stat().st_size for p in data.glob("konsul.db*"))

        print(f"\nHTTP KV benchmark, {started:%Y-%m-%d %H:%M} UTC")
        print(f"command: {sys.executable} {' '.join(sys.argv)}")
        print(f"konsul code: {measured_code}")
        print(f"machine: {machine()}")
        print(f"before the run: {quiet}")
        print(
            f"load: wrk {wrk_version()} -t{args.threads} (one thread: wrk and the server share the 2 cores), "
            f"{args.duration:g}s per run, {args.rounds} round(s){' (median)' if args.rounds > 1 else ''}; "
            f"PUT: a new key per request, {VALUE_BYTES}-byte values; GET: {args.keys} preloaded keys"
        )
        print(f"etcd: {etcd_version()} single node, default settings (fsync on every commit), v3 JSON gateway")
        print("konsul: edge, --durability full (SQLite synchronous=FULL, group commit), MQTT/CoAP off for the load runs")
        print(f"priority: servers and wrk run at niceness {NICE:+d} relative to this script (--nice)")
        print("server CPU: the server process's CPU time over the run (100% = one core); wrk CPU likewise; "
              "other CPU: the rest of the machine's busy time (other processes, kernel work not charged to them)\n")
        print(table(cells, args))
        if floor_results:
            top = max(args.connections)
            konsul_put = next((c for c in cells if c["target"] == "konsul" and c["op"] == "put"
                               and c["connections"] == top), None)
            print(f"\nHTTP layer floors: the same PUT workload, {top} connections, against do-nothing servers")
            print(floors_table(floor_results, konsul_put))
        commits = [c for c in cells if "writes_per_commit" in c]
        if commits:
            print("\nkonsul group commit during the PUT runs (from /metrics): " + ", ".join(
                f"{c['connections']} conn: {c['writes_per_commit']:.1f} writes per transaction" for c in commits))
        if extra:
            f, l = extra["fresh"], extra["loaded"]
            on = ", ".join(f"{k} {'listening' if v else 'NOT listening'}" for k, v in f["listening"].items())
            if f["everything"]:
                heading = f"konsul edge with everything on (--mqtt-addr, --coap-addr, --allow-anonymous; {on})"
            else:
                heading = (
                    "konsul edge with HTTP only: it did not start with MQTT and CoAP on "
                    f"({everything_failed})"
                )
            print(
                f"\n{heading}:\n"
                f"- start-up (spawn to 200 from /health/ready), empty data dir: median {f['startup_s'] * 1000:.0f} ms "
                f"of {len(f['startup_all_s'])} ({', '.join(f'{t * 1000:.0f}' for t in f['startup_all_s'])} ms) (direction: < 1 s), "
                f"with Python's bytecode cache warm (an installed package has it); the first start, with the cache "
                f"empty (it compiles every module, konsul's and its dependencies'): {extra['first'] * 1000:.0f} ms\n"
                f"- resident memory ready and idle ({args_idle:g} s after ready), empty data dir: VmRSS "
                f"{f['rss_kb'] / 1024:.1f} MiB (peak VmHWM {f['hwm_kb'] / 1024:.1f} MiB) (direction: < 40 MB)\n"
                f"- with the benchmark's data ({l['keys']:,} keys, {l['db_bytes'] / 1e6:.1f} MB on disk): start-up median "
                f"{l['startup_s'] * 1000:.0f} ms of {len(l['startup_all_s'])}, idle VmRSS {l['rss_kb'] / 1024:.1f} MiB"
            )
            rss_after = next(c for c in cells if c["target"] == "konsul").get("rss_after_kb")
            if rss_after:
                print(f"- VmRSS of the load-test edge after its runs: {rss_after / 1024:.1f} MiB")
        errors = sum(c["errors"] for c in cells + floor_results)
        print(f"\nbad responses in total: {errors}")
        if args.json:
            Path(args.json).write_text(json.dumps({"cells": cells, "startup": extra, "floors": floor_results},
                                                  indent=2, default=str))
        return 1 if errors else 0
    finally:
        for server in list(LIVE):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

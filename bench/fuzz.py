"""Long fuzz run over every parser that takes bytes from outside the agent.

Run it as ``.venv/bin/python bench/fuzz.py --minutes 10`` (``--help`` for
options). The targets and what each checks are the property tests' own
(``tests/fuzz/fuzz_targets.py``, ``tests/fuzz/fuzz_coap.py``); this runs them
for minutes instead of seconds:

- in-process targets run one at a time, each in a child process for its share
  of the time, under atheris (libFuzzer's coverage-guided mutation of the
  agent's own code, aiocoap and cbor2) when it is installed
  (``.venv/bin/pip install atheris``), else under a mutational loop over the
  target's seed corpus;
- the CoAP gateway runs in a real ``konsul edge --allow-anonymous``: batches of
  mutated datagrams, then the liveness probe (a CoAP GET, an HTTP GET, an
  acknowledged value still there). A batch that stops the edge is cut down to
  the one datagram that does it, recorded, and the edge restarted. A 5.00
  answer is recorded too, with the exception the edge logged for it.

A crash is a :class:`PropertyViolation` (an exception the parser does not
document, or an accepted input some reader then fails on), a timeout or
out-of-memory in the child, or an edge that stops serving. Crashes count as
unique by exception type and the line that raised it. The smallest input of
each unique crash, cut down further by deleting bytes while it still fails
the same way, is saved as ``bench/fuzz-crashes/<target>/<id>.bin`` (``id``
from the crash's key: a later run replaces the file of a crash it finds
again, and leaves the others); the run
prints, per target, executions and unique crashes, and writes
``bench/fuzz-crashes/summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "fuzz"), str(ROOT / "tests")]

CRASHES = ROOT / "bench" / "fuzz-crashes"
COAP = "coap_gateway"
MAX_INPUT = 4096


# -- what a crash is, and which ones are the same -------------------------------------


def crash_key(error: BaseException) -> str:
    """Exception type and the innermost line that raised it: one bug, one key."""
    cause = error.__cause__ or error
    frames = traceback.extract_tb(cause.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    label = str(error).split(":", 1)[0]
    kind = type(cause)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{label}: {name} at {where}"


def last_lines(error: BaseException, count: int = 4) -> str:
    cause = error.__cause__ or error
    lines = traceback.format_exception(type(cause), cause, cause.__traceback__)
    text = "".join(lines).rstrip().splitlines()
    return "\n".join(line for line in text[-count * 2 :] if not line.strip().startswith("^"))


class Findings:
    """Unique crashes of one target and the smallest input of each."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.execs = 0
        self.crashes: dict[str, dict] = {}

    def record(self, key: str, data: bytes, detail: str, count: int = 1) -> bool:
        """Keep ``data`` if ``key`` is new or ``data`` is smaller; True if the key is new."""
        found = self.crashes.get(key)
        if found is None:
            self.crashes[key] = {"key": key, "input": data.hex(), "count": count, "detail": detail}
            return True
        found["count"] += count
        if len(data) < len(bytes.fromhex(found["input"])):
            found["input"], found["detail"] = data.hex(), detail
        return False

    def as_json(self) -> dict:
        return {"target": self.target, "execs": self.execs, "crashes": list(self.crashes.values())}


# -- mutation (the fallback engine, and the CoAP datagrams) ---------------------------


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        edit = rng.randrange(7)
        at = rng.randint(0, len(buffer))
        if edit == 0:
            buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif edit == 1 and corpus:  # splice in a piece of another input
            other = rng.choice(corpus)
            start = rng.randint(0, len(other))
            buffer[at:at] = other[start : start + rng.randint(1, 16)]
        elif not buffer or at == len(buffer):
            continue
        elif edit == 2:
            buffer[at] = rng.randrange(256)
        elif edit == 3:
            buffer[at] ^= 1 << rng.randrange(8)
        elif edit == 4:
            del buffer[at : at + rng.randint(1, 4)]
        elif edit == 5:
            buffer[at:at] = bytes(buffer[at : at + rng.randint(1, 8)]) * rng.randint(1, 8)
        else:
            buffer[at] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0x1F, 0x20, 0x3F, 0x5B, 0x9F, 0xBF, 0xFB))
    return bytes(buffer[:MAX_INPUT])


# -- in-process targets, in a child ---------------------------------------------------


def run_child(target: str, seconds: float, engine: str, stats: Path, artifacts: Path) -> None:
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["konsul", "fuzz_targets", "aiocoap", "cbor2"]):
            import fuzz_targets
    else:
        import fuzz_targets
    check = fuzz_targets.TARGETS[target].check
    seeds = fuzz_targets.TARGETS[target].seeds()
    findings = Findings(target)
    last_write = [0.0]

    def write(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last_write[0] > 2:
            last_write[0] = now
            stats.write_text(json.dumps(findings.as_json()))

    def one(data: bytes) -> None:
        findings.execs += 1
        try:
            check(data)
        except fuzz_targets.PropertyViolation as violation:
            findings.record(crash_key(violation), data, last_lines(violation))
            write(force=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - a pyo3 panic: the worst kind, recorded, then go on
            findings.record(f"{target}: {crash_key(error)}", data, last_lines(error))
            write(force=True)
        write()

    if engine == "atheris":
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
        for index, seed in enumerate(seeds):
            (corpus / f"seed{index}").write_bytes(seed)
        atheris.Setup(
            [sys.argv[0], f"-max_total_time={int(seconds)}", f"-max_len={MAX_INPUT}", "-timeout=20",
             "-rss_limit_mb=3072", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)],
            one,
        )
        atheris.Fuzz()  # exits the process when the time is up
    rng = random.Random(target)
    corpus = list(seeds)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            data = mutate(rng, rng.choice(corpus), corpus) if rng.random() < 0.9 else os.urandom(rng.randint(0, 128))
            one(data)
            if rng.random() < 0.001 and len(corpus) < 500:
                corpus.append(data)
    write(force=True)


def run_in_child(target: str, seconds: float, engine: str, work: Path) -> Findings:
    """Run one target for ``seconds``; a child that dies (timeout, out of memory) is a crash and restarts."""
    findings = Findings(target)
    deadline = time.monotonic() + seconds
    artifacts = work / "raw" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    while (left := deadline - time.monotonic()) > 5:
        stats = artifacts / "stats.json"
        stats.unlink(missing_ok=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child", target, "--seconds", str(int(left)), "--engine", engine,
             "--stats", str(stats), "--artifacts", str(artifacts)],
            capture_output=True, text=True,
        )
        if stats.exists():
            partial = json.loads(stats.read_text())
            findings.execs += partial["execs"]
            for crash in partial["crashes"]:
                findings.record(crash["key"], bytes.fromhex(crash["input"]), crash["detail"], crash["count"])
        if child.returncode != 0:
            ending = "\n".join(line for line in child.stderr.splitlines() if "ERROR" in line or "Error" in line)[-400:]
            saved = sorted(artifacts.glob("*"), key=lambda p: p.stat().st_mtime)
            data = saved[-1].read_bytes() if saved else b""
            first = re.sub(r"==\d+==", "", ending.splitlines()[0]).strip() if ending else "?"
            findings.record(f"{target}: the child ended ({child.returncode}): {first}", data, ending or child.stderr[-400:])
    return findings


# -- cutting a crash down ---------------------------------------------------------------


def minimize(target: str, data: bytes, key: str, budget: int = 3000) -> bytes:
    """Delete chunks of ``data`` while the same crash (same key) still happens."""
    import fuzz_targets

    check = fuzz_targets.TARGETS[target].check

    def same(candidate: bytes) -> bool:
        try:
            check(candidate)
        except fuzz_targets.PropertyViolation as violation:
            return crash_key(violation) == key
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - a panic, as recorded by run_child
            return f"{target}: {crash_key(error)}" == key
        return False

    if not same(data):
        return data
    tries = 0
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and tries < budget:
        at, shrunk = 0, False
        while at < len(data) and tries < budget:
            candidate = data[:at] + data[at + chunk :]
            tries += 1
            if same(candidate):
                data, shrunk = candidate, True
            else:
                at += chunk
        if not shrunk:
            chunk //= 2
    return data


# -- the CoAP gateway in a running edge -----------------------------------------------


def run_coap(seconds: float, batch: int = 8) -> Findings:
    """Mutated datagrams into a running edge, in batches, each batch followed by the liveness probe.

    Each datagram is first decoded here with aiocoap's own decoder, which the
    edge runs on it: one it fails on other than by refusing it
    (``UnparsableMessage``) is a decoder crash. The first of each kind goes to
    the edge alone, to see whether it stops it; the others are counted and not
    sent, so the batches reach the code behind the decoder instead of
    stopping the edge on the same bug again and again.
    """
    from aiocoap import Message
    from aiocoap.error import UnparsableMessage
    from fuzz_coap import CoapEdge, seed_datagrams

    findings = Findings(COAP)
    rng = random.Random(COAP)
    seeds = seed_datagrams()
    edge = CoapEdge()
    decoder_crashes: set[str] = set()
    seen_lines = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            datagrams = []
            for _ in range(batch):
                data = mutate(rng, rng.choice(seeds), seeds)[:1200]
                findings.execs += 1
                try:
                    Message.decode(data)
                except UnparsableMessage:
                    pass
                except Exception as error:  # noqa: BLE001 - what the edge would meet
                    key = crash_key(error).split(": ", 1)[1]
                    if key in decoder_crashes:
                        findings.record(f"{COAP}: aiocoap decoder {key}", data, last_lines(error))
                        continue
                    decoder_crashes.add(key)
                    edge.send([data])
                    problem = edge.problem() or "the edge still serves"
                    findings.record(f"{COAP}: aiocoap decoder {key}: {problem}", data, edge.last_error(8))
                    findings.record(f"{COAP}: aiocoap decoder {key}", data, last_lines(error))
                    edge.restart()
                    seen_lines = 0
                    continue
                datagrams.append(data)
            edge.answers.clear()
            edge.send(datagrams)
            problem = edge.problem()
            if problem is not None:
                error = _raised(edge.process.lines)
                findings.record(f"{COAP}: {problem}: {error}", _culprit(datagrams), edge.last_error(8))
                edge.restart()
                seen_lines = 0
                continue
            if _internal_error(edge.answers):
                # Again one by one, each after the answer to the one before, to name the datagram.
                for data in datagrams:
                    seen_lines = len(edge.process.lines)
                    edge.answers.clear()
                    edge.exchange(data)
                    answer = _internal_error(edge.answers)
                    if answer is not None:
                        logged = edge.process.lines[seen_lines:]
                        findings.record(f"{COAP}: answered {answer.code}: {_raised(logged)}", data,
                                        "".join(logged)[-800:])
            seen_lines = len(edge.process.lines)
    finally:
        edge.stop()
    return findings


def _internal_error(answers: list):
    """The first answer that says the edge failed (5.xx other than 5.03 "overloaded"), if any."""
    return next((a for a in answers if a.code.class_ == 5 and a.code.dotted != "5.03"), None)


def _raised(lines: list[str]) -> str:
    """Type and place of the last exception an agent logged: ``Type at file:line``."""
    kind, where = "no traceback logged", ""
    for line in reversed(lines):
        text = line.strip()
        if kind == "no traceback logged":
            if text and not text.startswith(("File ", "^", "20", "konsul:")) and ":" in text and (
                "Error" in text or "Exception" in text
            ):
                kind = text.split(":", 1)[0]
        elif text.startswith("File "):
            name, _, rest = text[5:].partition(", line ")
            where = f" at {Path(name.strip(chr(34))).name}:{rest.split(',', 1)[0]}"
            break
    return kind + where


# -- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total time, shared by the targets")
    parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--engine", choices=("atheris", "mutate"), default=None,
                        help="default: atheris if installed, else the mutational loop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.seconds, args.engine, args.stats, args.artifacts)
        return

    import fuzz_targets

    engine = args.engine or ("atheris" if _has_atheris() else "mutate")
    names = [n for n in args.targets.split(",") if n] or [*fuzz_targets.TARGETS, COAP]
    share = args.minutes * 60 / len(names)
    CRASHES.mkdir(parents=True, exist_ok=True)
    summary = {"engine": engine, "minutes": args.minutes, "targets": []}
    print(f"engine {engine}, {share:.0f} s per target")
    for name in names:
        started = time.monotonic()
        findings = run_coap(share) if name == COAP else run_in_child(name, share, engine, CRASHES)
        for crash in findings.crashes.values():
            data = bytes.fromhex(crash["input"])
            if name != COAP and not crash["key"].startswith(f"{name}: the child ended"):
                data = minimize(name, data, crash["key"])
            crash["input"] = data.hex()
            crash["file"] = str(_save(name, crash["key"], data).relative_to(ROOT))
        result = findings.as_json()
        result["seconds"] = round(time.monotonic() - started)
        summary["targets"].append(result)
        print(f"{name:18} {findings.execs:>10} execs  {len(findings.crashes)} unique crashes")
        for crash in findings.crashes.values():
            print(f"    {crash['key']}  x{crash['count']}\n      input {crash['input'][:160]}")
    (CRASHES / "summary.json").write_text(json.dumps(summary, indent=1))


def _save(target: str, key: str, data: bytes) -> Path:
    folder = CRASHES / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(key.encode()).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    return path


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()

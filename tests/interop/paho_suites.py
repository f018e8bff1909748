"""Run the Eclipse Paho interoperability suites, unmodified, against a broker, inside the topic contract.

The suites (``client_test.py`` for MQTT 3.1.1, ``client_test5.py`` for MQTT 5.0)
live next to the project, at ``../shared/peers/paho.mqtt.testing/interoperability``
seen from the project root, and are never edited. They are written for a broker
that lets anyone use any topic; Konsul's broker serves only its topic contract
(docs/mqtt.md) to registered devices. So this module imports a suite and, before
it runs, replaces some of its module-level names:

- ``topics``, ``wildtopics``, ``nosubscribe_topics`` (and ``topic_prefix`` and
  ``setData`` in the 5.0 suite, which resets them when its test class starts):
  every topic and filter is moved under ``konsul/v1/kv/<prefix>/``, so a
  publish is a KV write and a subscription watches KV keys;
- ``host``, ``port``: the broker under test;
- ``mqtt_client``: the suite's client library, with ``Client`` replaced by a
  subclass that maps each client id to a registered device (``<prefix>-<client
  id>``, see ``device_id``) and logs in as it (user name = client id = device
  id, password = its token);
- ``time``: ``sleep`` with a deadline per case (``_CaseClock``).

Before each case the wrapper empties the prefix's keys when given the agent's
HTTP address (``kv_reset``).

Run as a program it runs one suite and writes each case's outcome to a JSON
file, so a test can run it in a child process with a deadline (the suites sleep
a lot and start threads that are not ours to stop):

    python tests/interop/paho_suites.py --suite v311 --port 1883 --prefix paho \\
        --credentials creds.json --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import threading
import time
import traceback
import types
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUITES_DIR = PROJECT_ROOT.parent / "shared" / "peers" / "paho.mqtt.testing" / "interoperability"

SUITE_FILES = {"v311": "client_test.py", "v5": "client_test5.py"}

# The suites' own topics, filters and client ids (the values their __main__ blocks set).
PLAIN_TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
PLAIN_WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
SUITE_CLIENT_IDS = ("myclientid", "myclientid2", "clean retained")

KV_TOPIC_ROOT = "konsul/v1/kv/"


def device_id(client_id: str, prefix: str) -> str:
    """The registered device a suite's client id logs in as: ``<prefix>-<client id>``.

    The prefix keeps two suites run side by side apart; a device id has no
    spaces, so the clean-up client ``clean retained`` becomes ``<prefix>-clean-retained``.
    """
    return f"{prefix}-{client_id.replace(' ', '-')}" if client_id else client_id


def device_ids(prefix: str) -> list[str]:
    """The devices a broker under test must know (their tokens go in the credentials file)."""
    return [device_id(client_id, prefix) for client_id in SUITE_CLIENT_IDS]


def suite_path(suite: str) -> Path:
    return SUITES_DIR / SUITE_FILES[suite]


def kv_topics(prefix: str) -> dict[str, Any]:
    """The suite's topic names, moved under ``konsul/v1/kv/<prefix>/``.

    A topic with an empty first level (``/TopicA``, ``/#``) keeps it: it becomes
    ``.../<prefix>//TopicA``, a key with an empty level.
    """
    root = f"{KV_TOPIC_ROOT}{prefix}/"
    return {
        "topics": tuple(root + topic for topic in PLAIN_TOPICS),
        "wildtopics": tuple(root + topic for topic in PLAIN_WILDTOPICS),
        # A KV filter outside every allowance the suite's devices are given.
        "nosubscribe_topics": (f"{KV_TOPIC_ROOT}nosubscribe/{prefix}",),
        "topic_prefix": root,
    }


def _client_library(original: types.ModuleType, prefix: str, credentials: dict[str, str]) -> types.ModuleType:
    """The suite's client module with ``Client`` logging in as the registered device."""

    class DeviceClient(original.Client):  # type: ignore[name-defined, misc]
        def __init__(self, clientid: bytes | str) -> None:
            text = clientid.decode("utf-8") if isinstance(clientid, bytes) else clientid
            mapped = device_id(text, prefix)
            self.device_id = mapped
            super().__init__(mapped.encode("utf-8") if isinstance(clientid, bytes) else mapped)

        def connect(self, *args: Any, **kwargs: Any) -> Any:
            token = credentials.get(self.device_id)
            if token is not None and kwargs.get("username") is None:
                kwargs["username"] = self.device_id
                kwargs["password"] = token.encode("utf-8")
            return super().connect(*args, **kwargs)

    library = types.ModuleType(original.__name__ + "_as_devices")
    library.__dict__.update({name: getattr(original, name) for name in dir(original) if not name.startswith("__")})
    library.Client = DeviceClient
    return library


def load_suite(suite: str, host: str, port: int, prefix: str, credentials: dict[str, str]) -> types.ModuleType:
    """Import one suite from its file, patched to run inside the topic contract against ``host:port``."""
    path = suite_path(suite)
    if str(SUITES_DIR) not in sys.path:
        sys.path.insert(0, str(SUITES_DIR))  # the suites import their own ``mqtt`` package
    spec = importlib.util.spec_from_file_location(f"paho_{suite}_suite", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    names = kv_topics(prefix)
    module.host, module.port = host, port
    module.topics = names["topics"]
    module.wildtopics = names["wildtopics"]
    module.nosubscribe_topics = names["nosubscribe_topics"]
    module.topic_prefix = names["topic_prefix"]
    module.mqtt_client = _client_library(module.mqtt_client, prefix, credentials)
    if hasattr(module, "setData"):
        # The 5.0 suite's test class calls setData() first, which sets the plain topics again.
        def set_data() -> None:
            module.topics = names["topics"]
            module.wildtopics = names["wildtopics"]
            module.nosubscribe_topics = names["nosubscribe_topics"]

        module.setData = set_data
    return module


def case_names(module: types.ModuleType) -> list[str]:
    """The suite's cases, in the order unittest runs them."""
    return list(unittest.TestLoader().getTestCaseNames(module.Test))


class CaseTimedOut(Exception):
    pass


class _CaseClock:
    """The suite's ``time`` module, with a deadline per case on ``sleep``.

    Some cases wait for messages in unbounded loops (``while len(callback.messages) < 3:
    time.sleep(.1)``); against a broker that never sends them they would hang the
    run. Every wait in the suites goes through ``time.sleep``, so past the deadline
    ``sleep`` raises and the case ends as an error saying so.
    """

    def __init__(self, real_time: types.ModuleType, deadline_s: float) -> None:
        self._time = real_time
        self._deadline_s = deadline_s
        self._ends = real_time.monotonic() + deadline_s

    def start_case(self) -> None:
        self._ends = self._time.monotonic() + self._deadline_s

    def sleep(self, seconds: float) -> None:
        if self._time.monotonic() + seconds > self._ends:
            raise CaseTimedOut(f"the case was still waiting after {self._deadline_s:.0f} s")
        self._time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


class _CaseResult(unittest.TestResult):
    """Each case's outcome as it ends, with what it printed (the suites print their tracebacks)."""

    def __init__(self, log: io.StringIO, record: Callable[[str, dict[str, str]], None]) -> None:
        super().__init__()
        self.log = log
        self.record = record
        self.current: str | None = None
        self.started = 0.0
        self._start = 0
        self._verdict: tuple[str, str] = ("pass", "")

    def startTest(self, test: unittest.TestCase) -> None:
        self._start = self.log.tell()
        self._verdict = ("pass", "")
        self.current, self.started = test._testMethodName, time.monotonic()
        super().startTest(test)

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._verdict = ("fail", self.failures[-1][1])

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._verdict = ("error", self.errors[-1][1])

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        self.current = None
        kind, text = self._verdict
        # The suites catch their own assertion errors and print the traceback before failing
        # with "False != True": what the case printed says what went wrong.
        printed = self.printed_since_start()
        self.record(test._testMethodName, {"outcome": kind, "detail": text + ("\n--- the case printed ---\n" + printed if kind != "pass" else "")})

    def printed_since_start(self) -> str:
        return self.log.getvalue()[self._start:][-3000:]


def run_suite(
    module: types.ModuleType,
    names: list[str],
    record: Callable[[str, dict[str, str]], None],
    before_each: Callable[[], None] | None = None,
    case_deadline_s: float = 30.0,
    on_stuck: Callable[[str, str], None] | None = None,
) -> None:
    """Run the suite's cases ``names``, passing each outcome (pass, fail, error) and why to ``record``.

    ``before_each`` runs before every case (the wrapper's reset of the KV prefix).
    ``case_deadline_s`` bounds each case's waits (``_CaseClock``); a case still
    running 15 s past it is stuck somewhere else (a blocking read in a loop, the
    client library's own waits), and ``on_stuck(case, printed)`` is called from a
    watchdog thread: it must end the process.
    """
    clock = _CaseClock(module.time, case_deadline_s)
    module.time = clock

    def set_up(self: unittest.TestCase) -> None:
        clock.start_case()
        if before_each is not None:
            before_each()

    module.Test.setUp = set_up
    suite = unittest.TestSuite(module.Test(name) for name in names)
    log = io.StringIO()
    result = _CaseResult(log, record)
    if on_stuck is not None:
        def watch() -> None:
            while True:
                time.sleep(1)
                case = result.current
                if case is not None and time.monotonic() - result.started > case_deadline_s + 15:
                    on_stuck(case, result.printed_since_start())

        threading.Thread(target=watch, daemon=True).start()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        suite.run(result)
    for test, text in result.errors:
        if not isinstance(test, unittest.TestCase):  # setUpClass failed: no case ran
            for name in names:
                record(name, {"outcome": "error", "detail": f"{test}: {text}\n{log.getvalue()[-3000:]}"})


def kv_reset(http_url: str, prefix: str) -> Callable[[], None]:
    """Delete every key under ``prefix`` over the agent's HTTP API.

    On the agent every KV write is state (retained, docs/mqtt.md), also when the
    suite publishes without the retain flag; emptying the prefix before each
    case gives the case what a fresh broker would.
    """
    import urllib.request

    def reset() -> None:
        request = urllib.request.Request(f"{http_url}/v1/kv/{prefix}/?recurse=true", method="DELETE")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    return reset


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITE_FILES), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="paho", help="KV prefix the suite's topics go under")
    parser.add_argument("--credentials", help="JSON file: {device id: token}")
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    parser.add_argument("--reset-kv", metavar="HTTP_URL", help="before each case, delete the prefix's keys at this agent")
    parser.add_argument("--case-deadline", type=float, default=30.0, help="seconds a case may wait")
    parser.add_argument("--out", required=True, help="where to write the JSON outcomes")
    parser.add_argument("--resume", action="store_true", help="keep the outcomes already in --out, run the rest")
    args = parser.parse_args(argv)
    out = Path(args.out)
    credentials = json.loads(Path(args.credentials).read_text()) if args.credentials else {}
    outcomes: dict[str, dict[str, str]] = json.loads(out.read_text()) if args.resume and out.exists() else {}

    def record(case: str, outcome: dict[str, str]) -> None:
        outcomes[case] = outcome
        partial = out.with_suffix(".partial")
        partial.write_text(json.dumps(outcomes, indent=1))
        partial.replace(out)

    def on_stuck(case: str, printed: str) -> None:
        # Threads of the suite's clients may hold sockets and loops we cannot stop:
        # record the case and start afresh on the remaining ones, in a new process image.
        record(case, {"outcome": "error", "detail": f"the case was stuck past its deadline ({args.case_deadline:.0f} s "
                      f"+ 15 s), not in a sleep\n--- the case printed ---\n{printed}"})
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                  *[a for a in argv if a != "--resume"], "--resume"])

    try:
        module = load_suite(args.suite, args.host, args.port, args.prefix, credentials)
        names = [name for name in (args.case or case_names(module)) if name not in outcomes]
        reset = kv_reset(args.reset_kv, args.prefix) if args.reset_kv else None
        run_suite(module, names, record, reset, args.case_deadline, on_stuck)
    except Exception:
        record("__load__", {"outcome": "error", "detail": traceback.format_exc()})
        return 1
    out.with_suffix(".done").write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

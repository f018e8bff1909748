"""Acknowledged writes survive a SIGKILL at any moment.

A writer process (forked by ``crash_writer.py``) takes durable writes from
many concurrent tasks, or from one (whose lone puts commit on the event
loop's thread, see ``Store.write_now``), and prints each key once its
``kv_put`` has returned.
The test reads until a random number of acknowledgements has arrived, SIGKILLs
the writer while its other tasks are mid-flight (some in a committing round,
some queued behind it), reopens the data directory in this process and checks
that every key the writer printed is there with its value. The rounds share
one data directory, so each one also starts from the previous crash.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from crash_writer import SCOPE, value_for

from konsul.sync.replica import Replica

FORKER = Path(__file__).with_name("crash_writer.py")
ROUNDS = 16
MAX_ACKS = 300
DEADLINE_S = 120  # only a hung writer gets near this


class Forker:
    """``crash_writer.py``: forks a writer per round and reports its pid and death."""

    def __init__(self, data_dir: Path, writers: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(FORKER), str(data_dir), str(writers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.writer: int | None = None  # pid of the live writer
        # If a writer hangs, killing everything ends the blocked reads below.
        self._watchdog = threading.Timer(DEADLINE_S, self.kill)
        self._watchdog.start()

    def crash_round(self, prefix: str, acks: int) -> list[str]:
        """Start a writer, SIGKILL it after ``acks`` acknowledgements, wait for its
        death; returns every key it acknowledged (``acks`` or a few more)."""
        self.process.stdin.write(f"{prefix}\n".encode())
        self.process.stdin.flush()
        keys: list[str] = []
        killed = False
        for raw in self.process.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("pid "):
                self.writer = int(line[4:])
            elif line.startswith("dead "):
                self.writer = None
                break
            else:
                keys.append(line)
            if not killed and self.writer is not None and len(keys) >= acks:
                os.kill(self.writer, signal.SIGKILL)
                killed = True
        assert killed, f"the writer of {prefix} ended by itself (see its stderr)"
        return keys

    def kill(self) -> None:
        if self.writer is not None:
            os.kill(self.writer, signal.SIGKILL)
        self.process.kill()

    def close(self) -> None:
        self._watchdog.cancel()
        if self.writer is not None:
            self.kill()
        self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


def missing_or_wrong(data_dir: Path, keys: list[str]) -> list[str]:
    replica = Replica.open(data_dir)
    try:
        kv = replica.scope(SCOPE).kv
        return [key for key in keys if (entry := kv.get(key)) is None or entry.value != value_for(key)]
    finally:
        replica.close()


@pytest.mark.parametrize("writers", [32, 1])
def test_every_acknowledged_write_survives_sigkill(tmp_path, writers):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    acknowledged: list[str] = []
    rounds = ROUNDS if writers > 1 else ROUNDS // 2  # lone puts come one at a time
    forker = Forker(data_dir, writers)
    try:
        for round_ in range(rounds):
            acks = rng.randint(1, MAX_ACKS)
            acknowledged += forker.crash_round(f"r{round_:02d}", acks)
            lost = missing_or_wrong(data_dir, acknowledged)
            assert not lost, (
                f"seed {seed}, round {round_} (killed after {acks} acks): "
                f"{len(lost)} of {len(acknowledged)} acknowledged keys lost or wrong, e.g. {lost[:5]}"
            )
    finally:
        forker.close()
    assert len(acknowledged) >= rounds

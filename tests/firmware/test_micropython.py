"""The MicroPython example device, run unchanged under CPython against a real edge.

``firmware_examples/micropython/main.py`` and the vendored ``umqtt/simple.py``
run in a child interpreter whose ``sys.path`` starts with the test's
``config.py`` and the ``shims/`` that stand in for ``machine``, ``network``,
``utime`` and friends.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_edge import FIRMWARE, DeviceEdge, start_edge, eventually

MICROPYTHON = FIRMWARE / "micropython"


class Board:
    """One simulated board: its config and its flash (the seq file) in a folder."""

    def __init__(self, folder: Path, edge: DeviceEdge, device_id: str, token: str, interval: float = 0.1) -> None:
        self.folder = folder
        self.device_id = device_id
        folder.mkdir(parents=True, exist_ok=True)
        host, port = edge.mqtt
        (folder / "config.py").write_text(
            f"WIFI_SSID = 'test-net'\nWIFI_PASSWORD = 'secret'\n"
            f"AGENT_HOST = {host!r}\nAGENT_PORT = {port}\n"
            f"DEVICE_ID = {device_id!r}\nTOKEN = {token!r}\n"
            f"INTERVAL = {interval!r}\nLED_PIN = 'LED'\n"
            f"STATE_FILE = {str(folder / 'konsul_seq')!r}\n"
            f"KEEPALIVE = 10\nRECONNECT_MIN = 0.2\nRECONNECT_MAX = 1\n"
        )
        self.proc: subprocess.Popen[str] | None = None

    def boot(self, max_samples: int | None) -> subprocess.Popen[str]:
        """Start main.main(max_samples) in a child; it exits 0 if it sent them all."""
        path = [str(self.folder), str(MICROPYTHON / "shims"), str(MICROPYTHON)]
        program = (
            f"import sys; sys.path[:0] = {path!r}; import main; "
            f"sent = main.main(max_samples={max_samples!r}); sys.exit(0 if sent == {max_samples!r} else 3)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", program], cwd=self.folder,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        return self.proc

    def finish(self, timeout: float = 30) -> str:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, out
        return out

    def power_off(self) -> str:
        """Cut it off without a goodbye: the agent must fall back on the Will."""
        assert self.proc is not None
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out


@pytest.fixture
def boards(tmp_path: Path):
    made: list[Board] = []

    def make(edge: DeviceEdge, device_id: str, **kwargs: object) -> Board:
        board = Board(tmp_path / device_id, edge, device_id, edge.create_device(device_id), **kwargs)
        made.append(board)
        return board

    yield make
    for board in made:
        if board.proc is not None and board.proc.poll() is None:
            board.power_off()


def test_samples_carry_a_seq_unique_across_reboots(edge, boards):
    board = boards(edge, "mpy-1")
    board.boot(max_samples=3)
    board.finish()
    board.boot(max_samples=3)  # a reboot: same flash, same config
    out = board.finish()

    samples = eventually(lambda: len(edge.telemetry("mpy-1")) >= 6 and edge.telemetry("mpy-1"), what="6 samples")
    seqs = [s["Seq"] for s in samples]
    assert len(samples) == 6 and len(set(seqs)) == 6, samples
    assert seqs == sorted(seqs)
    assert seqs[3] >> 20 == (seqs[0] >> 20) + 1, "the second boot starts a new epoch"
    for sample in samples:
        data = sample["Data"]
        assert data["seq"] == sample["Seq"] and isinstance(data["temp_c"], float)
        assert abs(data["ts"] - time.time()) < 120, "the clock was known, so samples carry ts"
    assert edge.reported("mpy-1") == {"interval": 0.1, "led": False, "firmware": "1.0.0"}, out
    # It said goodbye itself (a clean DISCONNECT suppresses the Will).
    eventually(lambda: not edge.online("mpy-1"), what="mpy-1 offline")


def test_desired_state_is_applied_and_reported_back(edge, boards):
    board = boards(edge, "mpy-2", interval=0.5)
    edge.set_desired("mpy-2", {"interval": 0.2, "led": True})  # retained: waiting when it connects
    board.boot(max_samples=None)
    eventually(lambda: edge.reported("mpy-2").get("led") is True, what="led on reported")
    assert edge.reported("mpy-2")["interval"] == 0.2
    eventually(lambda: edge.online("mpy-2"), what="mpy-2 online")

    edge.set_desired("mpy-2", {"interval": 0.3, "led": False})  # a change while connected
    eventually(lambda: edge.reported("mpy-2") == {"interval": 0.3, "led": False, "firmware": "1.0.0"},
               what="the new desired state reported")

    board.power_off()
    eventually(lambda: not edge.online("mpy-2"), what="the Will marking mpy-2 offline")


def test_reconnects_after_the_agent_restarts(tmp_path, boards):
    first = start_edge(tmp_path / "edge")
    board = boards(first, "mpy-3", interval=0.1)
    board.boot(max_samples=40)
    eventually(lambda: len(first.telemetry("mpy-3")) >= 5, what="samples before the restart")
    first.stop()
    second = DeviceEdge(tmp_path / "edge", first.mqtt[1], first.coap[1])
    try:
        board.finish(timeout=60)
        samples = eventually(lambda: len(second.telemetry("mpy-3")) >= 40 and second.telemetry("mpy-3"),
                             what="all 40 samples")
        seqs = [s["Seq"] for s in samples]
        assert len(seqs) == 40 == len(set(seqs)), "each sample once: the one in flight is resent, deduplicated"
    finally:
        second.stop()

"""The C example devices (libcoap 3, libmosquitto), built with their Makefile
and run against a real edge."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from device_edge import FIRMWARE, DeviceEdge, eventually

SOURCES = FIRMWARE / "c"
BUILD_DEPS = ["build-essential", "pkg-config", "libcoap3-dev", "libmosquitto-dev"]


def _missing_build_deps() -> list[str]:
    return [pkg for pkg in BUILD_DEPS if subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode != 0]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built programs' folder; installs the Debian build deps first if they are missing."""
    missing = _missing_build_deps()
    if missing:  # scripts/setup installs them; this covers a machine set up before they were added
        if shutil.which("apt-get") is None:
            pytest.fail(f"missing Debian packages {missing}: run scripts/setup")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    build = tmp_path_factory.mktemp("c-build")
    done = subprocess.run(["make", "-C", str(SOURCES), f"BUILD={build}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stderr, done.stderr  # the examples build clean with -Wall -Wextra
    return build


def run_device(program: Path, edge: DeviceEdge, device_id: str, token: str, port: int, folder: Path,
               samples: int, interval: float = 0.1) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(program), "-h", "127.0.0.1", "-p", str(port), "-d", device_id, "-k", token,
         "-n", str(samples), "-t", str(interval), "-s", str(folder / "seq")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return out


@pytest.mark.parametrize("kind", ["mqtt", "coap"])
def test_samples_arrive_with_unique_seq_across_restarts(edge, programs, tmp_path, kind):
    device_id = f"c-{kind}-1"
    token = edge.create_device(device_id)
    port = edge.mqtt[1] if kind == "mqtt" else edge.coap[1]
    program = programs / f"{kind}_device"
    finish(run_device(program, edge, device_id, token, port, tmp_path, samples=3))
    out = finish(run_device(program, edge, device_id, token, port, tmp_path, samples=3))  # a restart

    samples = eventually(lambda: len(edge.telemetry(device_id)) >= 6 and edge.telemetry(device_id),
                         what="6 samples")
    seqs = [s["Seq"] for s in samples]
    assert len(samples) == 6 and len(set(seqs)) == 6 and seqs == sorted(seqs), samples
    assert seqs[3] >> 20 == (seqs[0] >> 20) + 1, "the restart starts a new epoch"
    for sample in samples:
        assert sample["Data"]["seq"] == sample["Seq"]
        assert isinstance(sample["Data"]["temp_c"], float)
        assert abs(sample["Data"]["ts"] - time.time()) < 120
    assert edge.reported(device_id) == {"interval": 0.1, "led": False, "firmware": "1.0.0"}, out
    eventually(lambda: not edge.online(device_id), what=f"{device_id} offline after saying goodbye")


@pytest.mark.parametrize("kind", ["mqtt", "coap"])
def test_desired_state_is_applied_and_reported_back(edge, programs, tmp_path, kind):
    device_id = f"c-{kind}-2"
    token = edge.create_device(device_id)
    port = edge.mqtt[1] if kind == "mqtt" else edge.coap[1]
    edge.set_desired(device_id, {"interval": 0.2, "led": True})  # there before the device comes
    proc = run_device(programs / f"{kind}_device", edge, device_id, token, port, tmp_path, samples=0, interval=0.5)
    try:
        eventually(lambda: edge.reported(device_id).get("led") is True, what="led on reported")
        assert edge.reported(device_id)["interval"] == 0.2
        assert edge.online(device_id)

        edge.set_desired(device_id, {"interval": 0.3, "led": False})  # a change while it runs
        eventually(lambda: edge.reported(device_id) == {"interval": 0.3, "led": False, "firmware": "1.0.0"},
                   what="the new desired state reported")
    finally:
        out = stop(proc)
    assert "desired applied: interval 0.3 led off" in out, out

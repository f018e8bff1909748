"""`konsul edge` as a process: durability across kill -9, clean shutdown, refusals."""

from __future__ import annotations

import concurrent.futures
import hashlib
import signal
import subprocess
import sys

import httpx

from agents import MANAGEMENT_TOKEN, AgentProcess, EdgeProcess


def put(url: str, key: str, value: bytes) -> str:
    response = httpx.put(f"{url}/v1/kv/{key}", content=value, timeout=30)
    assert response.status_code == 200 and response.json() is True
    return key


def test_acknowledged_writes_survive_kill_9(tmp_path):
    edge = EdgeProcess(tmp_path / "data")
    acknowledged: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(put, edge.url, f"crash/{i}", f"value-{i}".encode()) for i in range(400)]
        # Kill once a good share is acknowledged, while the rest are in flight.
        for future in concurrent.futures.as_completed(futures):
            try:
                acknowledged.append(future.result())
            except (httpx.HTTPError, AssertionError):
                pass
            if len(acknowledged) == 250:
                edge.proc.send_signal(signal.SIGKILL)
    edge.stop()
    assert len(acknowledged) >= 250

    again = EdgeProcess(tmp_path / "data")
    try:
        with httpx.Client(base_url=again.url) as client:
            for key in acknowledged:
                response = client.get(f"/v1/kv/{key}?raw")
                assert response.status_code == 200, key
                assert response.content == f"value-{key.split('/')[1]}".encode()
    finally:
        again.stop()


def test_sigterm_shuts_down_cleanly_and_keeps_state(tmp_path):
    edge = EdgeProcess(tmp_path / "data")
    put(edge.url, "kept", b"yes")
    assert edge.stop(signal.SIGTERM) == 0
    assert "shutting down" in edge.output
    again = EdgeProcess(tmp_path / "data")
    try:
        assert httpx.get(f"{again.url}/v1/kv/kept?raw").content == b"yes"
    finally:
        assert again.stop(signal.SIGINT) == 0


def test_data_dir_in_use_is_refused(tmp_path):
    first = EdgeProcess(tmp_path / "data")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "konsul.cli", "edge", "--site", "s1",
             "--data-dir", str(tmp_path / "data"), "--http-addr", "127.0.0.1:0",
             "--mqtt-addr", "", "--coap-addr", ""],
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0
        assert "in use by process" in second.stderr
        assert httpx.get(f"{first.url}/health/ready").status_code == 200
    finally:
        first.stop()


def test_corrupt_database_is_reported_and_left_alone(tmp_path):
    data = tmp_path / "data"
    edge = EdgeProcess(data)
    put(edge.url, "k", b"v")
    edge.stop()
    db = data / "konsul.db"
    db.write_bytes(b"this is not a database" * 100)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    result = subprocess.run(
        [sys.executable, "-m", "konsul.cli", "edge", "--site", "s1", "--data-dir", str(data),
         "--http-addr", "127.0.0.1:0", "--mqtt-addr", "", "--coap-addr", ""],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert str(db) in result.stderr
    assert "left untouched" in result.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_flags_come_from_environment(tmp_path):
    agent = AgentProcess(
        ["edge"],
        env={
            "KONSUL_SITE": "envsite",
            "KONSUL_NODE": "envnode",
            "KONSUL_DATA_DIR": str(tmp_path / "data"),
            "KONSUL_HTTP_ADDR": "127.0.0.1:0",
            "KONSUL_MQTT_ADDR": "",
            "KONSUL_COAP_ADDR": "",
            "KONSUL_ACL_INITIAL_MANAGEMENT": MANAGEMENT_TOKEN,
        },
    )
    try:
        url = agent.wait_for(r"http listening on (http://\S+)").group(1)
        assert httpx.get(f"{url}/v1/agent/self").status_code == 403  # ACLs on by default
        me = httpx.get(f"{url}/v1/agent/self", headers={"X-Consul-Token": MANAGEMENT_TOKEN}).json()
        assert me["Config"]["Datacenter"] == "envsite"
        assert me["Config"]["NodeName"] == "envnode"
    finally:
        agent.stop()


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "konsul.cli", "edge", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--site", "--data-dir", "--hub-url", "--node", "--http-addr", "--mqtt-addr",
                 "--coap-addr", "--allow-anonymous", "--durability", "--acl", "--acl-initial-management", "--site-token",
                 "--tls-cert", "--mqtts-addr", "--hub-ca"):
        assert flag in result.stdout
    assert "KONSUL_HTTP_ADDR" in result.stdout

"""External-broker mode: `konsul edge --mqtt-broker mqtt://...` attached to a real mosquitto.

Each test starts its own mosquitto on a free 127.0.0.1 port with a generated
config file, and an edge attached to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import httpx
import pytest

from agents import AgentProcess, EdgeProcess, free_port
from test_mqtt_embedded import eventually, metric, mosquitto_pub, mosquitto_sub, stop_spawned  # noqa: F401 (fixture)

# Debian installs the broker in /usr/sbin, which not every PATH has.
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


ATTACHED = r"mqtt attached to the external broker"


def start_mosquitto(directory, port: int) -> AgentProcess:
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    broker = AgentProcess(["-c", str(config)], command=[MOSQUITTO])
    try:
        broker.wait_for(r"mosquitto version \S+ running")
    except AssertionError:
        broker.stop()
        raise
    return broker


@pytest.fixture
def broker(tmp_path):
    port = free_port()
    process = start_mosquitto(tmp_path, port)
    process.port = port
    yield process
    process.stop()


def attached_edge(tmp_path, broker) -> EdgeProcess:
    edge = EdgeProcess(tmp_path / "edge", extra=["--acl", "off", "--mqtt-broker", f"mqtt://127.0.0.1:{broker.port}"])
    edge.wait_for(ATTACHED)
    return edge


def test_kv_both_ways_without_echo_loops(tmp_path, broker):
    edge = attached_edge(tmp_path, broker)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            watcher = mosquitto_sub(broker.port, "-t", "konsul/v1/kv/ext/#", "-q", "1")
            assert mosquitto_pub(broker.port, "-t", "konsul/v1/kv/ext/a", "-m", "from-mqtt", "-r", "-q", "1").returncode == 0
            eventually(lambda: http.get("/v1/kv/ext/a?raw").text == "from-mqtt", what="the MQTT write over HTTP")
            assert http.put("/v1/kv/ext/b", content=b"from-http").json() is True
            watcher.wait_for(r"konsul/v1/kv/ext/b from-http")
            late = mosquitto_sub(broker.port, "-t", "konsul/v1/kv/ext/b", "-C", "1")
            late.wait_for(r"konsul/v1/kv/ext/b from-http")  # retained at the broker
            # Deleting by an empty retained payload.
            assert mosquitto_pub(broker.port, "-t", "konsul/v1/kv/ext/a", "-n", "-r", "-q", "1").returncode == 0
            eventually(lambda: http.get("/v1/kv/ext/a").status_code == 404, what="the deletion over HTTP")
            # The agent's own republishes came back and were not taken for writes.
            eventually(lambda: metric(http, "konsul_mqtt_messages_published_total", kind="kv") >= 3, what="3 republishes")
            index = http.get("/v1/kv/ext/b").json()[0]["ModifyIndex"]
            assert metric(http, "konsul_mqtt_messages_received_total", kind="kv_write") == 1
            assert metric(http, "konsul_mqtt_messages_received_total", kind="kv_delete") == 1
            assert http.get("/v1/kv/ext/b").json()[0]["ModifyIndex"] == index
            watcher.stop()
    finally:
        edge.stop()


def test_telemetry_status_and_last_will(tmp_path, broker):
    edge = attached_edge(tmp_path, broker)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            http.put("/v1/devices/ext-1", json={"Type": "sensor"})
            status = "konsul/v1/devices/ext-1/status"
            device = mosquitto_sub(broker.port, "-i", "ext-1", "-t", "konsul/v1/devices/ext-1/desired",
                                   "--will-topic", status, "--will-payload", "offline", "--will-retain")
            assert mosquitto_pub(broker.port, "-t", status, "-m", "online", "-r").returncode == 0
            eventually(lambda: http.get("/v1/devices/ext-1").json()["Online"], what="online")
            for payload in ('{"t": 1}', "not json"):
                mosquitto_pub(broker.port, "-t", "konsul/v1/devices/ext-1/telemetry", "-m", payload, "-q", "1")
            eventually(lambda: metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == 1, what="a sample")
            eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="payload") == 1, what="a refusal")
            device.proc.send_signal(signal.SIGKILL)  # mosquitto publishes the Will
            device.stop()
            eventually(lambda: http.get("/v1/devices/ext-1").json()["Online"] is False, what="offline by the Will")
    finally:
        edge.stop()


def test_stale_retained_state_is_corrected_and_restored_after_a_broker_restart(tmp_path, broker):
    # Before the agent attaches, the broker holds a retained value for a key the store does not have.
    assert mosquitto_pub(broker.port, "-t", "konsul/v1/kv/stale/x", "-m", "old", "-r").returncode == 0
    watcher = mosquitto_sub(broker.port, "-t", "konsul/v1/kv/stale/#")
    watcher.wait_for(r"konsul/v1/kv/stale/x old")
    edge = attached_edge(tmp_path, broker)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            watcher.wait_for(r"konsul/v1/kv/stale/x ?(\(null\))?$")  # cleared, not written into the store
            assert http.get("/v1/kv/stale/x").status_code == 404
            assert http.put("/v1/kv/stale/kept", content=b"mine").json() is True
            watcher.wait_for(r"konsul/v1/kv/stale/kept mine")
            watcher.stop()
            # A new, empty broker on the same port: the agent reconnects and republishes its state.
            broker.stop()
            fresh = start_mosquitto(tmp_path, broker.port)
            try:
                late = mosquitto_sub(broker.port, "-t", "konsul/v1/kv/stale/kept", "-C", "1")
                late.wait_for(r"konsul/v1/kv/stale/kept mine", timeout=20)
            finally:
                fresh.stop()
    finally:
        edge.stop()


def test_credentials_in_the_broker_url(tmp_path):
    port = free_port()
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "konsul", "s3cret"], check=True, capture_output=True)
    config = tmp_path / "mosquitto.conf"
    # As root, mosquitto drops to its own user, who cannot read pytest's private temp dir.
    user = "user root\n" if os.geteuid() == 0 else ""
    config.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\nlog_dest stderr\n")
    broker = AgentProcess(["-c", str(config)], command=[MOSQUITTO])
    try:
        broker.wait_for(r"mosquitto version \S+ running")
        wrong = EdgeProcess(tmp_path / "wrong", extra=["--acl", "off", "--mqtt-broker", f"mqtt://konsul:nope@127.0.0.1:{port}"])
        try:
            wrong.wait_for(r"the broker refused the connection \(CONNACK 5\)")
            assert httpx.get(f"{wrong.url}/health/live", timeout=10).status_code == 200  # serving all the same
            assert "nope" not in wrong.output
        finally:
            wrong.stop()
        right = EdgeProcess(tmp_path / "right", extra=["--acl", "off", "--mqtt-broker", f"mqtt://konsul:s3cret@127.0.0.1:{port}"])
        try:
            right.wait_for(ATTACHED)
            assert "s3cret" not in right.output
        finally:
            right.stop()
    finally:
        broker.stop()

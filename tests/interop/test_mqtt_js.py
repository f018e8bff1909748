"""MQTT.js (npm ``mqtt``, installed by scripts/setup into tests/interop/node) as a device of a real edge.

For MQTT 3.1.1 and 5.0: connect with the device's token, subscribe to its
desired state, publish telemetry and a KV write at QoS 1 (each acknowledged
once durable, so the HTTP API shows it at once), and receive a desired state
set over HTTP. The client runs as a child process (tests/interop/node/mqtt_device.js)
that prints one JSON line per step; the test waits on those lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from agents import AgentProcess
from gateway_edges import edge_http, mqtt_edge  # noqa: F401 - the module's fixtures edge and http

NODE_CLIENTS = Path(__file__).parent / "node"


def steps(device: AgentProcess) -> list[dict]:
    found = []
    for line in device.lines:
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def wait_step(device: AgentProcess, step: str) -> dict:
    """The client's line for ``step``; fails with everything it printed if it stopped first."""
    try:
        device.wait_for(f'"step":"{step}"')
    except AssertionError as missing:
        failed = [each for each in steps(device) if each["step"] in ("error", "timed out")]
        raise AssertionError(f"MQTT.js did not reach {step!r}: {failed or device.output}") from missing
    return next(each for each in steps(device) if each["step"] == step)


@pytest.mark.parametrize("version", [4, 5], ids=["mqtt-3.1.1", "mqtt-5"])
def test_mqtt_js_device(edge, http: httpx.Client, version: int) -> None:
    assert (NODE_CLIENTS / "node_modules" / "mqtt").is_dir(), "run scripts/setup (npm install in tests/interop/node)"
    device_id = f"mqttjs-{version}"
    registered = http.put(f"/v1/devices/{device_id}", json={"Type": "sensor", "KVWrite": [f"mqttjs/{version}/"]})
    assert registered.status_code == 201, registered.text
    token = registered.json()["Token"]
    key = f"mqttjs/{version}/setting"
    marker = f"firmware-for-mqttjs-{version}"

    device = AgentProcess(
        [str(NODE_CLIENTS / "mqtt_device.js"), str(edge.mqtt_port), device_id, token, str(version), key, marker],
        command=["node"],
    )
    try:
        connected = wait_step(device, "connected")
        assert connected["protocolVersion"] == version
        assert wait_step(device, "subscribed")["granted"] == [1]

        wait_step(device, "telemetry acknowledged")
        samples = http.get(f"/v1/devices/{device_id}/telemetry").json()
        assert [sample["Data"] for sample in samples] == [{"temp": 21.5, "client": "mqtt.js"}]

        wait_step(device, "kv write acknowledged")
        stored = http.get(f"/v1/kv/{key}", params={"raw": ""})
        assert stored.status_code == 200 and stored.text == f"written by MQTT.js v{version}"

        assert http.put(f"/v1/devices/{device_id}/desired", json={"firmware": marker}).status_code == 200
        desired = wait_step(device, "desired")
        assert json.loads(desired["payload"]) == {"firmware": marker}
        assert device.proc.wait(10) == 0, device.output
    finally:
        device.stop()

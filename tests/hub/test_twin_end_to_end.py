"""Device twins across real processes: desired state written on both sides of a partition.

The hub and the edge each change the desired state while the other is down;
after they reconnect both hold the field-by-field merge, the later write wins
the field both changed (the loser is reported as a conflict), and the device
hears every change on its own protocol: the retained MQTT desired topic and a
CoAP observation, both opened while the hub was still away.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading

import httpx
import paho.mqtt.client as mqtt
from agents import EdgeProcess, HubProcess, eventually, free_port, free_udp_port

ACL_OFF = ["--acl", "off"]  # these tests are about sync, not access control

COAP_CLIENT = shutil.which("coap-client") or shutil.which("coap-client-notls")


def twin(url: str, device_id: str, dc: str | None = None) -> dict:
    response = httpx.get(f"{url}/v1/devices/{device_id}/twin", params={"dc": dc} if dc else {})
    response.raise_for_status()
    return response.json()


def patch_desired(url: str, device_id: str, fields: dict, dc: str | None = None) -> None:
    response = httpx.patch(f"{url}/v1/devices/{device_id}/desired", json=fields, params={"dc": dc} if dc else {})
    response.raise_for_status()


class MqttDevice:
    """A device subscribed to its desired topic; what arrives queues up."""

    def __init__(self, port: int, device_id: str, token: str) -> None:
        self.messages: queue.Queue[dict] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id, token)
        topic = f"konsul/v1/devices/{device_id}/desired"
        self.client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic, 1)
        self.client.on_message = lambda c, u, message: self.messages.put(json.loads(message.payload))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CoapObserver:
    """libcoap's coap-client observing the device's desired state, as JSON lines."""

    def __init__(self, port: int, device_id: str, token: str) -> None:
        self.lines: queue.Queue[dict] = queue.Queue()
        uri = f"coap://127.0.0.1:{port}/devices/{device_id}/desired?ep={device_id}&tk={token}"
        self.proc = subprocess.Popen(
            [COAP_CLIENT, "-s", "120", "-w", "-A", "50", "-m", "get", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(json.loads(line))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def next_matching(messages: queue.Queue, wanted: dict, timeout: float = 30.0) -> dict:
    """Read ``messages`` until one equals ``wanted``; fail with what came instead."""
    seen = []
    try:
        while True:
            got = messages.get(timeout=timeout)
            seen.append(got)
            if got == wanted:
                return got
    except queue.Empty:
        raise AssertionError(f"never received {wanted}; got {seen}") from None


def test_desired_state_written_on_both_sides_of_a_partition_merges_and_reaches_the_device(tmp_path):
    assert COAP_CLIENT, "libcoap's coap-client is missing: run scripts/setup (Debian package libcoap3-bin)"
    hub_port, mqtt_port, coap_port = free_port(), free_port(), free_udp_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    ports = ["--acl", "off", "--mqtt-addr", f"127.0.0.1:{mqtt_port}", "--coap-addr", f"127.0.0.1:{coap_port}"]
    hub = HubProcess(tmp_path / "hub", hub_port, ACL_OFF)
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub_url, extra=ports)
    device = observer = None
    try:
        token = httpx.put(f"{edge.url}/v1/devices/pump-1", json={"Type": "pump"}).json()["Token"]
        patch_desired(edge.url, "pump-1", {"interval": 5, "mode": "eco"})
        eventually(lambda: twin(hub.url, "pump-1", "s1")["Desired"] == {"interval": 5, "mode": "eco"},
                   what="the first desired state at the hub")

        # The edge goes down; the hub changes two fields, then goes down too.
        edge.stop(signal.SIGKILL)
        patch_desired(hub.url, "pump-1", {"interval": 30, "mode": "auto"}, dc="s1")
        hub.stop(signal.SIGKILL)

        # The edge comes back alone and changes a field the hub changed, and a new one.
        edge = EdgeProcess(tmp_path / "edge", hub_url=hub_url, extra=ports)
        patch_desired(edge.url, "pump-1", {"mode": "boost", "led": True})
        offline = {"interval": 5, "led": True, "mode": "boost"}
        device = MqttDevice(mqtt_port, "pump-1", token)
        observer = CoapObserver(coap_port, "pump-1", token)
        next_matching(device.messages, offline)
        next_matching(observer.lines, offline)

        # The hub returns: both sides merge, and the device hears the merge at once.
        hub = HubProcess(tmp_path / "hub", hub_port, ACL_OFF)
        merged = {"interval": 30, "led": True, "mode": "boost"}
        next_matching(device.messages, merged)
        next_matching(observer.lines, merged)
        for url, dc in ((edge.url, None), (hub.url, "s1")):
            eventually(lambda url=url, dc=dc: twin(url, "pump-1", dc)["Desired"] == merged, what=f"merge at {url}")
            conflicts = twin(url, "pump-1", dc)["Conflicts"]
            assert [(c["Side"], c["Field"], c["Value"]) for c in conflicts] == [("desired", "mode", "auto")]
        # The conflict is counted where operators look for them, too.
        assert [s["Conflicts"] for s in httpx.get(f"{hub.url}/v1/sites").json()] == [1]
        # The hub's fleet-wide listing shows the device with its site.
        assert [(d["ID"], d["Site"]) for d in httpx.get(f"{hub.url}/v1/devices").json()] == [("pump-1", "s1")]

        # Reported state comes from the device; the delta is what it has yet to apply.
        device.client.publish("konsul/v1/devices/pump-1/reported", json.dumps({"interval": 30, "mode": "boost"}), qos=1).wait_for_publish(10)
        eventually(lambda: twin(hub.url, "pump-1", "s1")["Delta"] == {"led": True}, what="the delta at the hub")
    finally:
        for peer in (device, observer):
            if peer is not None:
                peer.close()
        edge.stop()
        hub.stop()

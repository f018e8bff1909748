"""Telemetry store-and-forward with real processes: kill -9, a hub that comes late, a full buffer."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import paho.mqtt.client as mqtt
from agents import EdgeProcess, HubProcess, eventually, free_port

ACL_OFF = ["--acl", "off"]  # these tests are about sync, not access control

TOPIC = "konsul/v1/devices/{}/telemetry"


class NumberedSensor:
    """A device that numbers its samples and keeps each until the edge acknowledged it (QoS 1)."""

    def __init__(self, device_id: str, token: str) -> None:
        self.device_id = device_id
        self.token = token
        self._acked: set[int] = set()
        self._in_flight: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client: mqtt.Client | None = None

    def connect(self, port: int) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=True)
        client.username_pw_set(self.device_id, self.token)
        client.max_inflight_messages_set(50)
        connected = threading.Event()
        client.on_connect = lambda c, u, flags, rc, props: connected.set()
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        assert connected.wait(10), "no CONNACK"
        self._in_flight = []  # what the last connection did not get acknowledged is resent by the caller
        self.client = client

    @property
    def acked(self) -> set[int]:
        """Samples the edge acknowledged (PUBACK), so far."""
        waiting = []
        for seq, info in self._in_flight:
            (self._acked.add(seq) if info.is_published() else waiting.append((seq, info)))
        self._in_flight = waiting
        return self._acked

    def send(self, seqs) -> None:
        for seq in seqs:
            payload = json.dumps({"seq": seq, "temp": 20 + seq % 10, "pad": "x" * 40})
            self._in_flight.append((seq, self.client.publish(TOPIC.format(self.device_id), payload, qos=1)))

    def drop_connection(self) -> None:
        self.client.loop_stop()
        self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def register(edge: EdgeProcess, device_id: str) -> str:
    response = httpx.put(f"{edge.url}/v1/devices/{device_id}", json={"Type": "thermo", "Tags": ["hall"]})
    response.raise_for_status()
    return response.json()["Token"]


def telemetry_status(edge: EdgeProcess) -> dict:
    return httpx.get(f"{edge.url}/v1/sync/status").json()["Telemetry"]


def hub_seqs(hub: HubProcess, device_id: str, site: str = "s1") -> list[int]:
    response = httpx.get(f"{hub.url}/v1/devices/{device_id}/telemetry", params={"dc": site, "limit": 10_000})
    response.raise_for_status()
    return [sample["Seq"] for sample in response.json()]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_10000_qos1_samples_survive_kill_9_and_reach_the_hub_exactly_once(tmp_path):
    hub_port = free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"  # nobody there yet: the hub is down
    mqtt_on = ["--acl", "off", "--mqtt-addr", "127.0.0.1:0"]
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub_url, extra=mqtt_on)
    hub = None
    sensor = NumberedSensor("sensor-1", register(edge, "sensor-1"))
    try:
        sensor.connect(edge.mqtt_addr()[1])
        sensor.send(range(0, 5_000))
        eventually(lambda: len(sensor.acked) == 5_000, what="the first 5,000 acknowledged")
        # Kill the edge while the second half is in flight.
        sensor.send(range(5_000, 10_000))
        eventually(lambda: len(sensor.acked) >= 6_000, what="some of the second half acknowledged")
        edge.stop(signal.SIGKILL)
        sensor.drop_connection()
        acked_before_kill = set(sensor.acked)
        assert 6_000 <= len(acked_before_kill) < 10_000, "the kill must land mid-stream"

        edge = EdgeProcess(tmp_path / "edge", hub_url=hub_url, extra=mqtt_on)
        # Everything acknowledged before the kill is still there.
        assert telemetry_status(edge)["Buffered"] >= len(acked_before_kill)
        sensor.connect(edge.mqtt_addr()[1])
        sensor.send(sorted(set(range(10_000)) - acked_before_kill))  # resend what was not acknowledged
        eventually(lambda: len(sensor.acked) == 10_000, what="all 10,000 acknowledged")

        hub = HubProcess(tmp_path / "hub", hub_port, ACL_OFF)
        eventually(lambda: telemetry_status(edge)["Buffered"] == 0, timeout=60, what="the buffer drained")
        assert hub_seqs(hub, "sensor-1") == list(range(10_000))
        assert telemetry_status(edge)["Dropped"] == 0
        samples = httpx.get(f"{hub.url}/v1/devices/sensor-1/telemetry", params={"dc": "s1", "limit": 2}).json()
        assert [s["Data"]["seq"] for s in samples] == [9_998, 9_999]
        # The fleet query finds the device by type and by tag.
        for query in ({"type": "thermo"}, {"tag": "hall"}):
            found = httpx.get(f"{hub.url}/v1/telemetry", params={**query, "limit": 10_000}).json()
            assert len(found) == 10_000 and {s["Site"] for s in found} == {"s1"}
    finally:
        sensor.close()
        edge.stop()
        if hub is not None:
            hub.stop()


def test_a_full_buffer_drops_the_oldest_and_counts_exactly_what_the_hub_misses(tmp_path):
    hub_port = free_port()
    edge = EdgeProcess(
        tmp_path / "edge",
        hub_url=f"http://127.0.0.1:{hub_port}",
        extra=["--acl", "off", "--mqtt-addr", "127.0.0.1:0", "--telemetry-buffer", "16KiB"],
    )
    hub = None
    sensor = NumberedSensor("sensor-2", register(edge, "sensor-2"))
    try:
        sensor.connect(edge.mqtt_addr()[1])
        sensor.send(range(1_000))
        eventually(lambda: len(sensor.acked) == 1_000, what="all samples acknowledged")
        status = telemetry_status(edge)
        dropped = status["Dropped"]
        assert dropped > 0 and status["BufferedBytes"] <= 16 * 1024
        assert status["Buffered"] + dropped == 1_000
        assert metric(edge.url, "konsul_telemetry_dropped_total") == dropped

        hub = HubProcess(tmp_path / "hub", hub_port, ACL_OFF)
        eventually(lambda: telemetry_status(edge)["Buffered"] == 0, what="the buffer drained")
        # The hub misses exactly the dropped samples, and they were the oldest.
        assert hub_seqs(hub, "sensor-2") == list(range(dropped, 1_000))
        assert telemetry_status(edge)["Dropped"] == dropped
    finally:
        sensor.close()
        edge.stop()
        if hub is not None:
            hub.stop()

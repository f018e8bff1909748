"""What the firmware tests share: an edge serving MQTT and CoAP, its device API, polling."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent))

from agents import EdgeProcess, eventually, free_port, free_udp_port  # noqa: E402,F401 (eventually: for the tests)

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware_examples"


class DeviceEdge(EdgeProcess):
    """An edge on fixed free ports, so that a restarted one comes back where devices expect it."""

    def __init__(self, data_dir: Path, mqtt_port: int, coap_port: int) -> None:
        super().__init__(
            data_dir,
            extra=["--acl", "off", "--mqtt-addr", f"127.0.0.1:{mqtt_port}", "--coap-addr", f"127.0.0.1:{coap_port}"],
        )
        self.mqtt = self.mqtt_addr()
        self.coap = self.coap_addr()

    def create_device(self, device_id: str) -> str:
        """Register a device; its token, which the agent shows only this once."""
        reply = httpx.put(f"{self.url}/v1/devices/{device_id}", json={"Type": "example"})
        assert reply.status_code == 201, reply.text
        return reply.json()["Token"]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10)

    def telemetry(self, device_id: str) -> list[dict]:
        reply = self.get(f"/v1/devices/{device_id}/telemetry")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def reported(self, device_id: str) -> dict:
        reply = self.get(f"/v1/devices/{device_id}/reported")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def set_desired(self, device_id: str, state: dict) -> None:
        reply = httpx.put(f"{self.url}/v1/devices/{device_id}/desired", json=state, timeout=10)
        assert reply.status_code in (200, 201), reply.text

    def online(self, device_id: str) -> bool:
        return self.get(f"/v1/devices/{device_id}").json()["Online"]


def start_edge(data_dir: Path) -> DeviceEdge:
    return DeviceEdge(data_dir, free_port(), free_udp_port())

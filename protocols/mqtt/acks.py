"""Acknowledgements of inbound QoS 1/2 PUBLISH packets, released in arrival order.

A receiver must acknowledge in the order the PUBLISH packets came
[MQTT-4.6.0-2], but the agent finishes them out of order (telemetry at once,
a KV write once durable): an acknowledgement waits for the ones before it.
Used by the broker's connections and by the external-broker client.
"""

from __future__ import annotations

from collections import deque

from .codec import MQTT_311, PUBACK, PUBREC, encode_ack


class OrderedAcks:
    """PUBACK/PUBREC frames for one connection, due in the order their PUBLISH packets came."""

    __slots__ = ("_pending", "version")

    def __init__(self, version: int = MQTT_311) -> None:
        self._pending: deque[list] = deque()  # [packet id, qos, reason code or None while pending]
        self.version = version

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, packet_id: int, qos: int) -> list:
        entry = [packet_id, qos, None]
        self._pending.append(entry)
        return entry

    def ready(self, entry: list, code: int = 0) -> bytes:
        """Mark ``entry`` done with reason ``code`` (v5; 0: success); the frames now due, in order."""
        entry[2] = code
        pending = self._pending
        if pending[0] is not entry:
            return b""
        due = bytearray()
        version = self.version
        while pending and pending[0][2] is not None:
            packet_id, qos, reason = pending.popleft()
            due += encode_ack(PUBACK if qos == 1 else PUBREC, packet_id, reason, version=version)
        return bytes(due)

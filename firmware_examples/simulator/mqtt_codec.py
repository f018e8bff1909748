"""The device side of MQTT 3.1.1, sans-IO: the packets a device sends, and a reader for the rest.

The agent has its own MQTT codec (``konsul.protocols.mqtt.frames``), but this
package sits in the device layer (``firmware_examples/``), below
``protocols/``, and may not import it: a device's code must not depend on the
agent's. A device needs far less anyway: it writes CONNECT (with a Last
Will), PUBLISH, PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT, and reads
CONNACK, PUBLISH, PUBACK, SUBACK and PINGRESP. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

# The agent never sends a device more than this (a desired state is small);
# anything larger means the stream is not MQTT or is corrupt.
MAX_INBOUND_BODY = 1 << 20


class MqttError(Exception):
    """The agent sent something a device cannot make sense of, or refused it."""


@dataclass(frozen=True, slots=True)
class Packet:
    type: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class InboundPublish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None


def _frame(header: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([header]) + bytes(encoded) + body


def _text(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def encode_connect(
    client_id: str,
    *,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """A clean-session CONNECT; ``will`` is (topic, payload, qos, retain)."""
    flags = 0x02
    tail = b""
    if will is not None:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += _text(topic) + _text(payload)
    if username is not None:
        flags |= 0x80
        tail += _text(username)
    if password is not None:
        flags |= 0x40
        tail += _text(password)
    body = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _text(client_id) + tail
    return _frame(CONNECT << 4, body)


def encode_publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int | None = None, retain: bool = False) -> bytes:
    header = (PUBLISH << 4) | (qos << 1) | (0x01 if retain else 0)
    body = _text(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _frame(header, body)


def encode_puback(packet_id: int) -> bytes:
    return _frame(PUBACK << 4, struct.pack("!H", packet_id))


def encode_subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    return _frame((SUBSCRIBE << 4) | 0x02, struct.pack("!H", packet_id) + _text(topic_filter) + bytes([qos]))


PINGREQ_BYTES = bytes([PINGREQ << 4, 0])
DISCONNECT_BYTES = bytes([DISCONNECT << 4, 0])


class PacketReader:
    """Cuts the agent's byte stream into packets."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Add received bytes; the packets now complete, in order."""
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        start = 0
        while True:
            found = self._next(buffer, start)
            if found is None:
                break
            packet, start = found
            packets.append(packet)
        if start:
            del buffer[:start]
        return packets

    @staticmethod
    def _next(buffer: bytearray, start: int) -> tuple[Packet, int] | None:
        length, multiplier, at = 0, 1, start + 1
        while True:
            if at >= len(buffer):
                return None
            byte = buffer[at]
            length += (byte & 0x7F) * multiplier
            at += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if multiplier > 128**3:
                raise MqttError("malformed remaining length from the agent")
        if length > MAX_INBOUND_BODY:
            raise MqttError(f"the agent sent a {length}-byte packet; a device expects at most {MAX_INBOUND_BODY}")
        end = at + length
        if end > len(buffer):
            return None
        header = buffer[start]
        return Packet(header >> 4, header & 0x0F, bytes(buffer[at:end])), end


def decode_connack(packet: Packet) -> int:
    """The CONNACK return code (0 is accepted)."""
    if len(packet.body) != 2:
        raise MqttError("malformed CONNACK")
    return packet.body[1]


def decode_packet_id(packet: Packet) -> int:
    if len(packet.body) < 2:
        raise MqttError(f"packet type {packet.type} without a packet id")
    return struct.unpack_from("!H", packet.body)[0]


def decode_publish(packet: Packet) -> InboundPublish:
    body = packet.body
    qos = (packet.flags >> 1) & 0x03
    if len(body) < 2:
        raise MqttError("malformed PUBLISH")
    (size,) = struct.unpack_from("!H", body)
    at = 2 + size
    topic = body[2:at].decode("utf-8", errors="replace")
    packet_id = None
    if qos:
        if len(body) < at + 2:
            raise MqttError("malformed PUBLISH: no packet id")
        (packet_id,) = struct.unpack_from("!H", body, at)
        at += 2
    return InboundPublish(topic, body[at:], qos, bool(packet.flags & 0x01), packet_id)

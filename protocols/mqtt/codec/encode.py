"""Packets to bytes: every MQTT 3.1.1 and 5.0 packet, for either side.

``encode(packet, version)`` takes any packet value; the ``encode_*``
functions build the common ones straight from their fields, without a packet
object in between (the broker's delivery path writes many PUBLISH frames per
read and should not allocate twice for each).
"""

from __future__ import annotations

import struct

from .packets import Ack, Auth, Connack, Connect, Disconnect, Packet, Ping, Publish, Suback, Subscribe, Subscription
from .packets import Unsuback, Unsubscribe
from .properties import Properties, pack_properties
from .spec import AUTH, CONNACK, CONNECT, DISCONNECT, MQTT_5, MQTT_311, PINGREQ, PUBACK, PUBCOMP, PUBLISH, PUBREC
from .spec import PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, V5_TO_V311_CONNACK, ConnectReturn
from .wire import pack_frame, pack_text, pack_u16

_PACKET_ID = struct.Struct("!H")
PINGREQ_BYTES = bytes((PINGREQ << 4, 0))
PINGRESP_BYTES = bytes((13 << 4, 0))
DISCONNECT_BYTES = bytes((DISCONNECT << 4, 0))  # 3.1.1, and a v5 normal disconnection


def encode_connect(
    client_id: str,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    username: str | None = None,
    password: str | bytes | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
    version: int = MQTT_311,
    properties: Properties | None = None,
    will_properties: Properties | None = None,
) -> bytes:
    """A CONNECT; ``will`` is (topic, payload, qos, retain)."""
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    v5 = version == MQTT_5
    tail = b""
    if will is not None:
        topic, payload, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        tail += (pack_properties(will_properties) if v5 else b"") + pack_text(topic) + pack_text(payload)
    if username is not None:
        tail += pack_text(username)
    if password is not None:
        tail += pack_text(password)
    body = pack_text("MQTT") + bytes((version, flags)) + pack_u16(keepalive)
    body += (pack_properties(properties) if v5 else b"") + pack_text(client_id) + tail
    return pack_frame(CONNECT << 4, body)


def encode_connack(session_present: bool, code: int, *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    """A CONNACK; ``code`` is a v5 reason code for a v5 client, else a 3.1.1 return code."""
    present = 1 if session_present and code == 0 else 0  # [MQTT-3.2.2-4], [MQTT-3.2.2-6]
    if version == MQTT_5:
        return pack_frame(CONNACK << 4, bytes((present, code)) + pack_properties(properties))
    return pack_frame(CONNACK << 4, bytes((present, code)))


def connack_code(reason: int, version: int) -> int:
    """A v5 CONNACK reason as ``version`` reads it (3.1.1 has six return codes)."""
    if version == MQTT_5:
        return reason
    return int(V5_TO_V311_CONNACK.get(reason, ConnectReturn.SERVER_UNAVAILABLE))  # type: ignore[call-overload]


def encode_refusal_for(level: int) -> bytes:
    """The CONNACK refusing a CONNECT of protocol ``level``, in the form that version parses.

    MQTT 5 (level 5) and later read a reason code and a properties length:
    0x84, "unsupported protocol version". Earlier levels read the 3.1.1 form.
    """
    if level >= MQTT_5:
        return pack_frame(CONNACK << 4, bytes((0, 0x84, 0)))
    return encode_connack(False, ConnectReturn.BAD_PROTOCOL)


def encode_publish(
    topic: str, payload: bytes, qos: int = 0, retain: bool = False, packet_id: int | None = None, dup: bool = False,
    *, version: int = MQTT_311, properties: Properties | None = None,
) -> bytes:
    header = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    raw = topic.encode("utf-8")
    body = _PACKET_ID.pack(len(raw)) + raw
    if qos:
        body += _PACKET_ID.pack(packet_id)
    if version == MQTT_5:
        body += pack_properties(properties)
    return pack_frame(header, body + payload)


def encode_ack(kind: int, packet_id: int, code: int = 0, *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (``kind``); a v5 one carries ``code`` unless it is success."""
    header = (kind << 4) | (0x02 if kind == PUBREL else 0)
    if version == MQTT_5 and (code or properties):
        tail = bytes((code,)) + (pack_properties(properties) if properties else b"")
        return pack_frame(header, _PACKET_ID.pack(packet_id) + tail)
    return bytes((header, 2)) + _PACKET_ID.pack(packet_id)


def encode_puback(packet_id: int, code: int = 0, *, version: int = MQTT_311) -> bytes:
    return encode_ack(PUBACK, packet_id, code, version=version)


def encode_pubrec(packet_id: int, code: int = 0, *, version: int = MQTT_311) -> bytes:
    return encode_ack(PUBREC, packet_id, code, version=version)


def encode_pubrel(packet_id: int, code: int = 0, *, version: int = MQTT_311) -> bytes:
    return encode_ack(PUBREL, packet_id, code, version=version)


def encode_pubcomp(packet_id: int, code: int = 0, *, version: int = MQTT_311) -> bytes:
    return encode_ack(PUBCOMP, packet_id, code, version=version)


def encode_subscribe(
    packet_id: int, filters: list[tuple[str, int]] | list[Subscription], *, version: int = MQTT_311,
    properties: Properties | None = None,
) -> bytes:
    body = _PACKET_ID.pack(packet_id) + (pack_properties(properties) if version == MQTT_5 else b"")
    for item in filters:
        sub = item if isinstance(item, Subscription) else Subscription(item[0], item[1])
        options = sub.qos
        if version == MQTT_5:
            options |= (0x04 if sub.no_local else 0) | (0x08 if sub.retain_as_published else 0) | (sub.retain_handling << 4)
        body += pack_text(sub.topic_filter) + bytes((options,))
    return pack_frame((SUBSCRIBE << 4) | 0x02, body)


def encode_suback(packet_id: int, codes: list[int], *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    props = pack_properties(properties) if version == MQTT_5 else b""
    return pack_frame(SUBACK << 4, _PACKET_ID.pack(packet_id) + props + bytes(codes))


def encode_unsubscribe(packet_id: int, filters: list[str], *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    body = _PACKET_ID.pack(packet_id) + (pack_properties(properties) if version == MQTT_5 else b"")
    return pack_frame((UNSUBSCRIBE << 4) | 0x02, body + b"".join(pack_text(f) for f in filters))


def encode_unsuback(packet_id: int, codes: list[int] | None = None, *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    if version != MQTT_5:
        return pack_frame(UNSUBACK << 4, _PACKET_ID.pack(packet_id))
    return pack_frame(UNSUBACK << 4, _PACKET_ID.pack(packet_id) + pack_properties(properties) + bytes(codes or ()))


def encode_disconnect(code: int = 0, *, version: int = MQTT_311, properties: Properties | None = None) -> bytes:
    if version != MQTT_5 or (not code and not properties):
        return DISCONNECT_BYTES
    return pack_frame(DISCONNECT << 4, bytes((code,)) + (pack_properties(properties) if properties else b""))


def encode_auth(code: int = 0, *, properties: Properties | None = None) -> bytes:
    if not code and not properties:
        return bytes((AUTH << 4, 0))
    return pack_frame(AUTH << 4, bytes((code,)) + (pack_properties(properties) if properties else b""))


def encode_pingreq() -> bytes:
    return PINGREQ_BYTES


def encode(packet: Packet, version: int = MQTT_311) -> bytes:
    """Any packet value as bytes for a ``version`` peer."""
    if isinstance(packet, Publish):
        return encode_publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.packet_id, packet.dup,
                              version=version, properties=packet.properties)
    if isinstance(packet, Ack):
        return encode_ack(packet.type, packet.packet_id, packet.reason_code, version=version, properties=packet.properties)
    if isinstance(packet, Connect):
        will = packet.will
        return encode_connect(
            packet.client_id, keepalive=packet.keepalive, clean_session=packet.clean_start, username=packet.username,
            password=packet.password, version=packet.protocol_level, properties=packet.properties,
            will=None if will is None else (will.topic, will.payload, will.qos, will.retain),
            will_properties=None if will is None else will.properties,
        )
    if isinstance(packet, Connack):
        return encode_connack(packet.session_present, packet.reason_code, version=version, properties=packet.properties)
    if isinstance(packet, Subscribe):
        return encode_subscribe(packet.packet_id, packet.subscriptions, version=version, properties=packet.properties)
    if isinstance(packet, Suback):
        return encode_suback(packet.packet_id, packet.reason_codes, version=version, properties=packet.properties)
    if isinstance(packet, Unsubscribe):
        return encode_unsubscribe(packet.packet_id, packet.topic_filters, version=version, properties=packet.properties)
    if isinstance(packet, Unsuback):
        return encode_unsuback(packet.packet_id, packet.reason_codes, version=version, properties=packet.properties)
    if isinstance(packet, Disconnect):
        return encode_disconnect(packet.reason_code, version=version, properties=packet.properties)
    if isinstance(packet, Auth):
        return encode_auth(packet.reason_code, properties=packet.properties)
    if isinstance(packet, Ping):
        return bytes((packet.type << 4, 0))
    raise TypeError(f"not an MQTT packet: {packet!r}")

"""Bytes to packets: every MQTT 3.1.1 and 5.0 packet, from either side.

``decode(frame, version)`` checks the fixed-header flags, decodes the body
and refuses trailing bytes; anything wrong raises :class:`ProtocolViolation`.
A CONNECT names its own version (``decode_connect``); every later packet of
the connection is read with it. Which packets may come when is the
connection's business (``server/connection.py``), not the codec's.
"""

from __future__ import annotations

from collections.abc import Callable

from .packets import PING_REQUEST, PING_RESPONSE, Ack, Auth, Connack, Connect, Disconnect, Packet, Publish
from .packets import Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will
from .properties import NO_PROPERTIES, WILL, read_properties
from .spec import AUTH, CONNACK, CONNECT, DISCONNECT, FIXED_FLAGS, MAX_FILTERS, MQTT_5, MQTT_311, PACKET_NAMES
from .spec import PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK
from .spec import UNSUBSCRIBE, ProtocolViolation, UnsupportedProtocol
from .wire import Cursor, Frame


def decode(frame: Frame, version: int = MQTT_311) -> Packet:
    """The packet in ``frame``, read as MQTT ``version`` (4 or 5)."""
    kind = frame.type
    if kind == PUBLISH:
        return decode_publish(frame, version)
    expected = FIXED_FLAGS.get(kind)
    if expected is None or (kind == AUTH and version < MQTT_5):
        raise ProtocolViolation("malformed", f"packet type {kind} does not exist in MQTT {_name(version)}")
    if frame.flags != expected:
        raise ProtocolViolation("malformed", f"{PACKET_NAMES[kind]} with reserved flags {frame.flags:#x}")
    return _DECODERS[kind](frame.body, version)


def decode_connect(frame: Frame) -> Connect:
    """A CONNECT of 3.1.1 or 5.0; :class:`UnsupportedProtocol` for another version."""
    if frame.type != CONNECT or frame.flags:
        raise ProtocolViolation("malformed", "expected a CONNECT")
    cursor = Cursor(frame.body)
    name = cursor.text("protocol name")
    level = cursor.u8()
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocol(level, f"protocol {name!r} level {level}; this broker speaks MQTT 3.1.1 (level 4) and 5.0 (level 5)")
    flags = cursor.u8()
    if flags & 0x01:  # [MQTT-3.1.2-3]
        raise ProtocolViolation("malformed", "CONNECT reserved flag set")
    has_will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3 or (not has_will and (will_qos or will_retain)):
        raise ProtocolViolation("malformed", f"CONNECT flags {flags:#04x} are inconsistent")
    if has_password and not has_user and level == MQTT_311:  # [MQTT-3.1.2-22]; v5 allows it
        raise ProtocolViolation("malformed", "CONNECT with a password but no user name")
    keepalive = cursor.u16()
    properties = read_properties(cursor, CONNECT) if level == MQTT_5 else NO_PROPERTIES
    client_id = cursor.text("client id")
    will = None
    if has_will:
        will_properties = read_properties(cursor, WILL) if level == MQTT_5 else NO_PROPERTIES
        will = Will(cursor.text("will topic"), cursor.binary(), will_qos, will_retain, will_properties)
        _check_topic_name(will.topic, "will topic")
    username = cursor.text("user name") if has_user else None
    password = cursor.binary() if has_password else None
    _end(cursor, "CONNECT")
    return Connect(level, bool(flags & 0x02), keepalive, client_id, will, username, password, properties)


def decode_publish(frame: Frame, version: int = MQTT_311) -> Publish:
    flags = frame.flags
    qos = (flags >> 1) & 0x03
    if qos == 3:  # [MQTT-3.3.1-4]
        raise ProtocolViolation("malformed", "PUBLISH with QoS 3")
    if qos == 0 and flags & 0x08:  # [MQTT-3.3.1-2]
        raise ProtocolViolation("malformed", "PUBLISH at QoS 0 with the DUP flag")
    body = frame.body
    cursor = Cursor(body)
    topic = cursor.text("topic")
    packet_id = None
    if qos:
        packet_id = cursor.u16()
        if packet_id == 0:  # [MQTT-2.3.1-1]
            raise ProtocolViolation("malformed", "PUBLISH packet id 0")
    properties = read_properties(cursor, PUBLISH) if version == MQTT_5 else NO_PROPERTIES
    if not topic:
        if properties.topic_alias is None:  # [MQTT-3.3.2-1], and v5 without an alias
            raise ProtocolViolation("protocol" if version == MQTT_5 else "malformed", "PUBLISH with an empty topic")
    else:
        _check_topic_name(topic, "PUBLISH topic")
    return Publish(topic, body[cursor.pos :], qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, properties)


def _check_topic_name(topic: str, what: str) -> None:
    if "+" in topic or "#" in topic:  # [MQTT-3.3.2-2]
        raise ProtocolViolation("malformed", f"{what} {topic!r} has a wildcard")


def _connack(body: bytes, version: int) -> Connack:
    cursor = Cursor(body)
    flags = cursor.u8()
    if flags & 0xFE:  # [MQTT-3.2.2-1]
        raise ProtocolViolation("malformed", "CONNACK reserved flags set")
    code = cursor.u8()
    properties = read_properties(cursor, CONNACK) if version == MQTT_5 else NO_PROPERTIES
    _end(cursor, "CONNACK")
    return Connack(bool(flags & 0x01), code, properties)


def _ack(kind: int) -> Callable[[bytes, int], Ack]:
    def decode_ack(body: bytes, version: int) -> Ack:
        cursor = Cursor(body)
        packet_id = _packet_id(cursor, PACKET_NAMES[kind])
        code, properties = 0, NO_PROPERTIES
        if version == MQTT_5 and cursor.left():  # a bare packet id means success [MQTT-3.4.2-1]
            code = cursor.u8()
            if cursor.left():
                properties = read_properties(cursor, kind)
        _end(cursor, PACKET_NAMES[kind])
        return Ack(kind, packet_id, code, properties)

    return decode_ack


def _subscribe(body: bytes, version: int) -> Subscribe:
    cursor = Cursor(body)
    packet_id = _packet_id(cursor, "SUBSCRIBE")
    properties = read_properties(cursor, SUBSCRIBE) if version == MQTT_5 else NO_PROPERTIES
    subscriptions: list[Subscription] = []
    while _more_filters(cursor, subscriptions, "SUBSCRIBE"):
        topic_filter = cursor.text("topic filter")
        options = cursor.u8()
        qos = options & 0x03
        reserved = options & (0xC0 if version == MQTT_5 else 0xFC)
        retain_handling = (options >> 4) & 0x03 if version == MQTT_5 else 0
        if not topic_filter or qos == 3 or reserved or retain_handling == 3:  # [MQTT-3.8.3-4/5], [MQTT-4.7.3-1]
            raise ProtocolViolation("malformed", f"SUBSCRIBE to {topic_filter!r} with options byte {options:#x}")
        no_local = bool(options & 0x04) if version == MQTT_5 else False
        if no_local and topic_filter.startswith("$share/"):  # [MQTT-3.8.3-4]
            raise ProtocolViolation("protocol", f"no local on the shared subscription {topic_filter!r}")
        retain_as_published = bool(options & 0x08) if version == MQTT_5 else False
        subscriptions.append(Subscription(topic_filter, qos, no_local, retain_as_published, retain_handling))
    if not subscriptions:  # [MQTT-3.8.3-3]
        raise ProtocolViolation("malformed", "SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, subscriptions, properties)


def _suback(body: bytes, version: int) -> Suback:
    cursor = Cursor(body)
    packet_id = cursor.u16()
    properties = read_properties(cursor, SUBACK) if version == MQTT_5 else NO_PROPERTIES
    codes = list(cursor.rest())
    if not codes:
        raise ProtocolViolation("malformed", "SUBACK without a return code")
    return Suback(packet_id, codes, properties)


def _unsubscribe(body: bytes, version: int) -> Unsubscribe:
    cursor = Cursor(body)
    packet_id = _packet_id(cursor, "UNSUBSCRIBE")
    properties = read_properties(cursor, UNSUBSCRIBE) if version == MQTT_5 else NO_PROPERTIES
    filters: list[str] = []
    while _more_filters(cursor, filters, "UNSUBSCRIBE"):
        topic_filter = cursor.text("topic filter")
        if not topic_filter:
            raise ProtocolViolation("malformed", "UNSUBSCRIBE from an empty topic filter")
        filters.append(topic_filter)
    if not filters:  # [MQTT-3.10.3-2]
        raise ProtocolViolation("malformed", "UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, filters, properties)


def _unsuback(body: bytes, version: int) -> Unsuback:
    cursor = Cursor(body)
    packet_id = cursor.u16()
    if version != MQTT_5:
        _end(cursor, "UNSUBACK")
        return Unsuback(packet_id)
    properties = read_properties(cursor, UNSUBACK)
    return Unsuback(packet_id, list(cursor.rest()), properties)


def _empty(kind: int) -> Callable[[bytes, int], Packet]:
    value = {PINGREQ: PING_REQUEST, PINGRESP: PING_RESPONSE}.get(kind)

    def decode_empty(body: bytes, version: int) -> Packet:
        if body:
            raise ProtocolViolation("malformed", f"{PACKET_NAMES[kind]} with a {len(body)}-byte body")
        return value if value is not None else Disconnect()

    return decode_empty


def _disconnect(body: bytes, version: int) -> Disconnect:
    if version != MQTT_5:
        return _empty(DISCONNECT)(body, version)  # type: ignore[return-value]
    return Disconnect(*_reason_and_properties(body, DISCONNECT))


def _auth(body: bytes, version: int) -> Auth:
    return Auth(*_reason_and_properties(body, AUTH))


def _reason_and_properties(body: bytes, kind: int) -> tuple:
    if not body:  # no body: success (normal disconnection) [MQTT-3.14.2-1], [MQTT-3.15.2-1]
        return 0, NO_PROPERTIES
    cursor = Cursor(body)
    code = cursor.u8()
    properties = read_properties(cursor, kind) if cursor.left() else NO_PROPERTIES
    _end(cursor, PACKET_NAMES[kind])
    return code, properties


def _packet_id(cursor: Cursor, what: str) -> int:
    packet_id = cursor.u16()
    if packet_id == 0:
        raise ProtocolViolation("malformed", f"{what} packet id 0")  # [MQTT-2.3.1-1]
    return packet_id


def _more_filters(cursor: Cursor, filters: list, what: str) -> bool:
    if len(filters) >= MAX_FILTERS and cursor.left():
        raise ProtocolViolation("limit", f"{what} with more than {MAX_FILTERS} topic filters")
    return bool(cursor.left())


def _end(cursor: Cursor, what: str) -> None:
    if cursor.left():
        raise ProtocolViolation("malformed", f"{what} has {cursor.left()} trailing bytes")


def _not_twice(body: bytes, version: int) -> Packet:
    raise ProtocolViolation("protocol", "a second CONNECT")  # [MQTT-3.1.0-2]


def _name(version: int) -> str:
    return "5.0" if version == MQTT_5 else "3.1.1"


_DECODERS: dict[int, Callable[[bytes, int], Packet]] = {
    CONNECT: _not_twice,
    CONNACK: _connack,
    PUBACK: _ack(PUBACK),
    PUBREC: _ack(PUBREC),
    PUBREL: _ack(PUBREL),
    PUBCOMP: _ack(PUBCOMP),
    SUBSCRIBE: _subscribe,
    SUBACK: _suback,
    UNSUBSCRIBE: _unsubscribe,
    UNSUBACK: _unsuback,
    PINGREQ: _empty(PINGREQ),
    PINGRESP: _empty(PINGRESP),
    DISCONNECT: _disconnect,
    AUTH: _auth,
}


def decode_packet_id(frame: Frame) -> int:
    """The packet id at the start of an acknowledgement's body."""
    return Cursor(frame.body).u16()

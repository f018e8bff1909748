"""MQTT 5 properties (section 2.2.2): every one, typed, checked per packet type.

A property set is a :class:`Properties` value with one attribute per
property (None when absent; the two that may repeat, user properties and
subscription identifiers, are tuples). Decoding refuses what the
specification calls a malformed packet or a protocol error: an unknown
identifier, one not allowed in that packet, a property given twice that may
appear once, a value out of its range.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .spec import AUTH, CONNACK, CONNECT, DISCONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL
from .spec import SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, ProtocolViolation
from .wire import Cursor, pack_binary, pack_text, pack_u16, pack_u32, pack_varint

WILL = 16  # not a packet type: the will properties inside a CONNECT

BYTE, U16, U32, VARINT, BINARY, UTF8, PAIR = range(7)
_ACKS = (PUBACK, PUBREC, PUBREL, PUBCOMP)

# id: (attribute, data type, packet types it may appear in)
PROPERTY_TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, frozenset({PUBLISH, WILL})),
    0x02: ("message_expiry_interval", U32, frozenset({PUBLISH, WILL})),
    0x03: ("content_type", UTF8, frozenset({PUBLISH, WILL})),
    0x08: ("response_topic", UTF8, frozenset({PUBLISH, WILL})),
    0x09: ("correlation_data", BINARY, frozenset({PUBLISH, WILL})),
    0x0B: ("subscription_identifiers", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", U32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", UTF8, frozenset({CONNACK})),
    0x13: ("server_keep_alive", U16, frozenset({CONNACK})),
    0x15: ("authentication_method", UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", U32, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", UTF8, frozenset({CONNACK})),
    0x1C: ("server_reference", UTF8, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", UTF8, frozenset({CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH})),
    0x21: ("receive_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", U16, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: ("user_properties", PAIR, frozenset({CONNECT, CONNACK, PUBLISH, WILL, *_ACKS, SUBSCRIBE, SUBACK,
                                                UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH})),
    0x27: ("maximum_packet_size", U32, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}
_ID_OF = {name: ident for ident, (name, _kind, _where) in PROPERTY_TABLE.items()}
# Byte properties that are booleans: any other value is a protocol error.
_FLAGS = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
# Properties whose value 0 is a protocol error.
_NOT_ZERO = {0x0B: "subscription identifier", 0x21: "receive maximum", 0x23: "topic alias", 0x27: "maximum packet size"}


@dataclass(frozen=True, slots=True)
class Properties:
    """One packet's properties; None (or empty) where absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def replace(self, **changes: object) -> Properties:
        """A copy with ``changes`` (a frozen value cannot be edited in place)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Properties(**values)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return self != NO_PROPERTIES


NO_PROPERTIES = Properties()


def read_properties(cursor: Cursor, packet_type: int) -> Properties:
    """The property set at ``cursor`` (its length first) of a ``packet_type`` packet."""
    length = cursor.varint()
    if length == 0:
        return NO_PROPERTIES
    if cursor.left() < length:
        raise ProtocolViolation("malformed", "properties run past the end of the packet")
    end = cursor.pos + length
    inner = Cursor(cursor.body, cursor.pos, end)
    cursor.pos = end
    values: dict[str, object] = {}
    pairs: list[tuple[str, str]] = []
    identifiers: list[int] = []
    while inner.left():
        ident = inner.varint()
        entry = PROPERTY_TABLE.get(ident)
        if entry is None:
            raise ProtocolViolation("malformed", f"unknown property {ident:#04x}")
        name, kind, where = entry
        if packet_type not in where:
            raise ProtocolViolation("malformed", f"property {name} is not allowed here")
        if kind == PAIR:
            pairs.append((inner.text("user property name"), inner.text("user property value")))
            continue
        value = _read_value(inner, kind, name)
        if ident in _NOT_ZERO and value == 0:
            raise ProtocolViolation("protocol", f"{_NOT_ZERO[ident]} 0")
        if ident in _FLAGS and value not in (0, 1):
            raise ProtocolViolation("protocol", f"property {name} is {value}, not 0 or 1")
        if ident == 0x0B:
            if identifiers and packet_type != PUBLISH:
                raise ProtocolViolation("protocol", "subscription identifier given twice")
            identifiers.append(value)  # type: ignore[arg-type]
            continue
        if name in values:  # [MQTT-2.2.2-2] and each property's "more than once" rule
            raise ProtocolViolation("protocol", f"property {name} given twice")
        values[name] = value
    if pairs:
        values["user_properties"] = tuple(pairs)
    if identifiers:
        values["subscription_identifiers"] = tuple(identifiers)
    return Properties(**values)  # type: ignore[arg-type]


def _read_value(cursor: Cursor, kind: int, name: str) -> object:
    if kind == BYTE:
        return cursor.u8()
    if kind == U16:
        return cursor.u16()
    if kind == U32:
        return cursor.u32()
    if kind == VARINT:
        return cursor.varint()
    if kind == BINARY:
        return cursor.binary()
    return cursor.text(name.replace("_", " "))


def pack_properties(properties: Properties | None) -> bytes:
    """The property set with its length in front; one zero byte for none."""
    if properties is None or properties is NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for ident, (name, kind, _where) in PROPERTY_TABLE.items():
        value = getattr(properties, name)
        if value is None or value == ():
            continue
        if kind == PAIR:
            for key, text in value:
                out += bytes((ident,)) + pack_text(key) + pack_text(text)
        elif kind == VARINT:
            for number in value:
                out += bytes((ident,)) + pack_varint(number)
        else:
            out += bytes((ident,)) + _pack_value(kind, value)
    return pack_varint(len(out)) + bytes(out)


def _pack_value(kind: int, value: object) -> bytes:
    if kind == BYTE:
        return bytes((value,))  # type: ignore[arg-type]
    if kind == U16:
        return pack_u16(value)  # type: ignore[arg-type]
    if kind == U32:
        return pack_u32(value)  # type: ignore[arg-type]
    if kind == BINARY:
        return pack_binary(value)  # type: ignore[arg-type]
    return pack_text(value)  # type: ignore[arg-type]


def property_id(name: str) -> int:
    """The identifier of the property ``name`` (an attribute of :class:`Properties`)."""
    return _ID_OF[name]

"""What the MQTT 3.1.1 and 5.0 specifications fix: packet types, versions, reason codes, the error.

Everything a peer can get wrong on the wire is a :class:`ProtocolViolation`:
one exception type for every malformed input, carrying the ``reason`` label
of ``konsul_mqtt_refused_total`` ("malformed", "too_large", "protocol",
"limit") and the MQTT 5 reason code a v5 peer is told (in a CONNACK or a
DISCONNECT) before the connection closes.
"""

from __future__ import annotations

from enum import IntEnum

# Control packet types (section 2.1.2 of both versions).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
    PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}
# The fixed-header flags every packet but PUBLISH must carry (section 2.2.2 / 2.1.3).
FIXED_FLAGS = {
    CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, SUBACK: 0,
    UNSUBSCRIBE: 2, UNSUBACK: 0, PINGREQ: 0, PINGRESP: 0, DISCONNECT: 0, AUTH: 0,
}
# Packets a client sends, and packets a server sends (AUTH and DISCONNECT: both, in v5).
FROM_CLIENT = frozenset({CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH})
FROM_SERVER = frozenset({CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP, DISCONNECT, AUTH})

MQTT_311, MQTT_5 = 4, 5  # the protocol levels of a CONNECT
MAX_TOPIC_BYTES = 65535
MAX_PACKET_ID = 65535
MAX_VARIABLE_INT = 268_435_455  # four bytes of seven bits
MAX_FILTERS = 256  # topic filters in one SUBSCRIBE or UNSUBSCRIBE; a device needs a handful


class ReasonCode(IntEnum):
    """MQTT 5 reason codes (section 2.4); the v3.1.1 CONNACK return codes are :class:`ConnectReturn`."""

    SUCCESS = 0x00  # also "normal disconnection" and "granted QoS 0"
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnectReturn(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)."""

    ACCEPTED = 0
    BAD_PROTOCOL = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_CREDENTIALS = 4
    NOT_AUTHORIZED = 5


# A v5 CONNACK reason as a v3.1.1 client reads it (MQTT 5 section 3.2.2.2 maps them the other way).
V5_TO_V311_CONNACK = {
    ReasonCode.SUCCESS: ConnectReturn.ACCEPTED,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnectReturn.BAD_PROTOCOL,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnectReturn.IDENTIFIER_REJECTED,
    ReasonCode.SERVER_UNAVAILABLE: ConnectReturn.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_BUSY: ConnectReturn.SERVER_UNAVAILABLE,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnectReturn.BAD_CREDENTIALS,
    ReasonCode.NOT_AUTHORIZED: ConnectReturn.NOT_AUTHORIZED,
}
V311_TO_V5_CONNACK = {
    ConnectReturn.ACCEPTED: ReasonCode.SUCCESS,
    ConnectReturn.BAD_PROTOCOL: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ConnectReturn.IDENTIFIER_REJECTED: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ConnectReturn.SERVER_UNAVAILABLE: ReasonCode.SERVER_UNAVAILABLE,
    ConnectReturn.BAD_CREDENTIALS: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    ConnectReturn.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
}

# The metrics reason of a violation, and the v5 reason code that tells the peer.
_CODE_OF_REASON = {
    "malformed": ReasonCode.MALFORMED_PACKET,
    "protocol": ReasonCode.PROTOCOL_ERROR,
    "too_large": ReasonCode.PACKET_TOO_LARGE,
    "limit": ReasonCode.QUOTA_EXCEEDED,
}


class ProtocolViolation(Exception):
    """The peer broke MQTT (a remote protocol error, in h11's terms).

    Args:
        reason: the ``konsul_mqtt_refused_total`` label: "malformed" (bad
            encoding), "protocol" (a well-formed packet where it may not be),
            "too_large", "limit" (over one of our per-connection bounds).
        detail: what was wrong, for the log.
        code: the MQTT 5 reason code to send (a DISCONNECT, or a CONNACK when
            it is the CONNECT); by default the one ``reason`` implies.
    """

    def __init__(self, reason: str, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.code = int(code if code is not None else _CODE_OF_REASON.get(reason, ReasonCode.UNSPECIFIED_ERROR))


class UnsupportedProtocol(ProtocolViolation):
    """A CONNECT of an MQTT version we do not speak (``level``); answered in a form that version reads."""

    def __init__(self, level: int, detail: str) -> None:
        super().__init__("protocol", detail, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
        self.level = level

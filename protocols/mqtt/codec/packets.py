"""The MQTT control packets as values, one class per kind (the acknowledgements share one).

The same classes serve 3.1.1 and 5.0: the v5-only parts (reason codes,
properties, subscription options) take their 3.1.1 meaning by default, and
the encoder leaves them out for a 3.1.1 peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .properties import NO_PROPERTIES, Properties
from .spec import MQTT_311, PINGREQ, PINGRESP


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES  # v5: will delay, message expiry, content type, ...


@dataclass(slots=True)
class Connect:
    protocol_level: int  # 4 (3.1.1) or 5
    clean_start: bool  # 3.1.1's "clean session"
    keepalive: int
    client_id: str
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties = NO_PROPERTIES

    # The 3.1.1 names, for code that reads a CONNECT either way.
    @property
    def clean_session(self) -> bool:
        return self.clean_start

    @property
    def will_topic(self) -> str | None:
        return None if self.will is None else self.will.topic

    @property
    def will_payload(self) -> bytes | None:
        return None if self.will is None else self.will.payload

    @property
    def will_qos(self) -> int:
        return 0 if self.will is None else self.will.qos

    @property
    def will_retain(self) -> bool:
        return False if self.will is None else self.will.retain


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason_code: int  # v5 reason code, or the 3.1.1 return code
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Publish:
    topic: str  # v5: may be empty when a topic alias names it
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (``type``)."""

    type: int
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (the last three are v5's)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0  # 0: send retained on subscribe, 1: only if new, 2: never


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Suback:
    packet_id: int
    reason_codes: list[int]  # per filter: granted QoS or a failure (0x80 in 3.1.1)
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: list[str]
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Unsuback:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # v5 only
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Ping:
    """PINGREQ or PINGRESP (``type``)."""

    type: int


PING_REQUEST = Ping(PINGREQ)
PING_RESPONSE = Ping(PINGRESP)

Packet = Connect | Connack | Publish | Ack | Subscribe | Suback | Unsubscribe | Unsuback | Disconnect | Auth | Ping

__all__ = [
    "MQTT_311", "Ack", "Auth", "Connack", "Connect", "Disconnect", "Packet", "Ping", "PING_REQUEST", "PING_RESPONSE",
    "Publish", "Suback", "Subscribe", "Subscription", "Unsuback", "Unsubscribe", "Will",
]

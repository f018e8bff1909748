"""One client connection of the broker, as a sans-IO state machine (MQTT 3.1.1 and 5.0).

Theory of operation
-------------------
A :class:`ServerConnection` is fed the bytes a client sent
(:meth:`~ServerConnection.receive_data`) and hands back, one at a time, the
events the broker has to decide on (:meth:`~ServerConnection.next_event`):
the CONNECT, each PUBLISH, each SUBSCRIBE and UNSUBSCRIBE, the end. What it
can answer alone it answers alone: PINGRESP, PUBCOMP for a PUBREL, PUBREL for
a PUBREC, freeing an in-flight message on its PUBACK (QoS 1) or PUBCOMP (QoS 2). Whatever it has to say
accumulates in one buffer the adapter writes whenever it likes
(:meth:`~ServerConnection.data_to_send`), so a read that carried a hundred
packets is answered with one write. Nothing here does I/O or reads a clock:
times are passed in.

The connection goes through the states in :data:`TRANSITIONS` (h11's shape:
the table is the truth, the methods only look it up). While the broker
decides on a CONNECT (``ADMITTING``), later bytes stay buffered unread.
Which packets a client may send in each state is :data:`CLIENT_PACKETS`; any
other, and anything malformed, raises :class:`ProtocolViolation` (the
client's error; for a v5 client a DISCONNECT with the reason code is queued
before the connection closes). A call the state does not allow raises
:class:`LocalProtocolError` (ours: a bug in the broker).

Acknowledgements of the client's QoS 1 and 2 messages go out in the order
the messages came [MQTT-4.6.0-2], each once the broker says the message is
handled (:meth:`~ServerConnection.acknowledge`; a KV write once durable),
and with a v5 reason code when it was refused. Messages to the client go
through its session's receive window (v5 receive maximum): past it they
wait in the session's queue and leave as acknowledgements free the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .. import codec
from ..acks import OrderedAcks
from ..codec import MQTT_5, MQTT_311, Connect, Properties, ProtocolViolation, Publish, ReasonCode
from .sessions import OutMessage, Session


class LocalProtocolError(Exception):
    """The broker asked the connection for something its state does not allow."""


class State(Enum):
    CONNECTING = "connecting"  # waiting for the CONNECT
    ADMITTING = "admitting"  # CONNECT read; the broker decides
    CONNECTED = "connected"
    CLOSED = "closed"


# (state, what happened) -> next state. Anything not here is not allowed.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CONNECTING, "CONNECT"): State.ADMITTING,
    (State.ADMITTING, "accept"): State.CONNECTED,
    (State.ADMITTING, "refuse"): State.CLOSED,
    (State.CONNECTED, "DISCONNECT"): State.CLOSED,
    (State.CONNECTED, "disconnect"): State.CLOSED,  # the server ends it (take-over, kick, keep-alive)
    (State.CONNECTING, "violation"): State.CLOSED,
    (State.ADMITTING, "violation"): State.CLOSED,
    (State.CONNECTED, "violation"): State.CLOSED,
}
CLIENT_PACKETS: dict[State, frozenset[int]] = {
    State.CONNECTING: frozenset({codec.CONNECT}),
    State.ADMITTING: frozenset(),
    State.CONNECTED: frozenset(codec.FROM_CLIENT - {codec.CONNECT}),
    State.CLOSED: frozenset(),
}

# What the broker announces to a v5 client, and holds every client to.
RECEIVE_MAXIMUM = 1024  # QoS 1/2 messages from a client not yet acknowledged; also 3.1.1's QoS 2 bound
TOPIC_ALIAS_MAXIMUM = 32
KEEPALIVE_GRACE = 1.5  # silence past 1.5 times the keep-alive ends the connection [MQTT-3.1.2-24]


def max_packet_for(max_payload: int) -> int:
    """The largest packet a client may send, header included: a payload at the limit, a topic, properties."""
    return max_payload + codec.MAX_TOPIC_BYTES + 1024 + 5


@dataclass(slots=True)
class ConnectReceived:
    connect: Connect


@dataclass(slots=True)
class MessageReceived:
    """A PUBLISH for the broker; ``ack`` (QoS 1/2) goes back to :meth:`ServerConnection.acknowledge`."""

    publish: Publish
    ack: list | None


@dataclass(slots=True)
class SubscribeReceived:
    subscribe: codec.Subscribe


@dataclass(slots=True)
class UnsubscribeReceived:
    unsubscribe: codec.Unsubscribe


@dataclass(slots=True)
class Disconnected:
    """The client sent DISCONNECT. ``with_will``: v5 reason 0x04, publish the will anyway."""

    with_will: bool
    session_expiry: int | None  # a v5 client may change it on the way out


Event = ConnectReceived | MessageReceived | SubscribeReceived | UnsubscribeReceived | Disconnected


class ServerConnection:
    """The broker's side of one client connection (see the module docstring)."""

    __slots__ = (
        "state", "version", "connect", "session", "max_payload", "_splitter", "_out", "_acks", "_qos2",
        "_aliases", "last_heard", "keepalive", "send_window", "max_packet_to_client", "_initial_expiry",
    )

    def __init__(self, max_payload: int, now: float = 0.0) -> None:
        self.state = State.CONNECTING
        self.version = MQTT_311
        self.connect: Connect | None = None
        self.session: Session | None = None
        self.max_payload = max_payload
        self._splitter = codec.FrameSplitter(max_packet_for(max_payload) - 5)
        self._out = bytearray()
        self._acks = OrderedAcks()
        self._qos2: set[int] = set()  # QoS 2 packet ids handled, awaiting PUBREL
        self._aliases: dict[int, str] = {}
        self.last_heard = now
        self.keepalive = 0
        self.send_window = 65535  # the client's receive maximum (v5); 3.1.1 has none
        self.max_packet_to_client: int | None = None
        self._initial_expiry = 0

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        self._splitter.feed(data)
        self.last_heard = now

    def next_event(self) -> Event | None:
        """The next event for the broker; None until more bytes come (or while admitting)."""
        try:
            while self.state in (State.CONNECTING, State.CONNECTED):
                frame = self._splitter.next_frame()
                if frame is None:
                    return None
                if frame.type not in CLIENT_PACKETS[self.state]:
                    name = codec.PACKET_NAMES.get(frame.type, f"type {frame.type}")
                    if self.state is State.CONNECTING:
                        raise ProtocolViolation("malformed", f"{name} before CONNECT")  # [MQTT-3.1.0-1]
                    if frame.type == codec.CONNECT:  # [MQTT-3.1.0-2]
                        raise ProtocolViolation("malformed", "a second CONNECT", ReasonCode.PROTOCOL_ERROR)
                    raise ProtocolViolation("malformed", f"{name} is not a packet a client sends")
                event = self._handle(frame)
                if event is not None:
                    return event
            return None
        except ProtocolViolation as violation:
            self._violated(violation)
            raise

    def keepalive_deadline(self) -> float | None:
        """When silence ends the connection; None without a keep-alive."""
        if self.state is State.CONNECTED and self.keepalive:
            return self.last_heard + KEEPALIVE_GRACE * self.keepalive
        return None

    def _handle(self, frame: codec.Frame) -> Event | None:
        if frame.type == codec.PUBLISH:
            return self._publish(codec.decode_publish(frame, self.version))
        if self.state is State.CONNECTING:
            connect = codec.decode_connect(frame)
            self._transition("CONNECT")
            self.connect = connect
            self.version = connect.protocol_level
            self.keepalive = connect.keepalive
            self._acks.version = connect.protocol_level
            return ConnectReceived(connect)
        packet = codec.decode(frame, self.version)
        kind = frame.type
        if kind == codec.PUBACK or kind == codec.PUBCOMP:
            self._release(packet.packet_id)  # type: ignore[union-attr]
        elif kind == codec.PUBREC:
            self._received_by_client(packet.packet_id, packet.reason_code)  # type: ignore[union-attr]
        elif kind == codec.PUBREL:
            # Answer unknown ids as well [MQTT-4.3.3-1]; v5 says it did not know them.
            packet_id = packet.packet_id  # type: ignore[union-attr]
            known = packet_id in self._qos2
            self._qos2.discard(packet_id)
            code = 0 if known or self.version != MQTT_5 else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
            self._out += codec.encode_pubcomp(packet_id, code, version=self.version)
        elif kind == codec.PINGREQ:
            self._out += codec.PINGRESP_BYTES
        elif kind == codec.SUBSCRIBE:
            return SubscribeReceived(packet)  # type: ignore[arg-type]
        elif kind == codec.UNSUBSCRIBE:
            return UnsubscribeReceived(packet)  # type: ignore[arg-type]
        elif kind == codec.DISCONNECT:
            expiry = packet.properties.session_expiry_interval  # type: ignore[union-attr]
            if expiry and not self._initial_expiry:  # [MQTT-3.14.2-2]
                raise ProtocolViolation("protocol", "DISCONNECT sets a session expiry the CONNECT did not have")
            self._transition("DISCONNECT")
            return Disconnected(packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL, expiry)  # type: ignore[union-attr]
        elif kind == codec.AUTH:
            raise ProtocolViolation("protocol", "AUTH without an authentication method in the CONNECT")
        return None

    def _publish(self, publish: Publish) -> MessageReceived | None:
        if len(publish.payload) > self.max_payload:
            raise ProtocolViolation(
                "too_large", f"a {len(publish.payload)}-byte payload on {publish.topic!r} is over the {self.max_payload}-byte limit"
            )
        alias = publish.properties.topic_alias if self.version == MQTT_5 else None
        if alias is not None:
            if alias > TOPIC_ALIAS_MAXIMUM:  # [MQTT-3.3.2-9]
                raise ProtocolViolation("protocol", f"topic alias {alias} over the maximum {TOPIC_ALIAS_MAXIMUM}",
                                        ReasonCode.TOPIC_ALIAS_INVALID)
            if publish.topic:
                self._aliases[alias] = publish.topic
            else:
                topic = self._aliases.get(alias)
                if topic is None:
                    raise ProtocolViolation("protocol", f"topic alias {alias} was never set", ReasonCode.TOPIC_ALIAS_INVALID)
                publish.topic = topic
        qos = publish.qos
        if qos == 0:
            return MessageReceived(publish, None)
        packet_id = publish.packet_id
        if qos == 2 and packet_id in self._qos2:
            # A resend before PUBREL: handled already, acknowledge again [MQTT-4.3.3-9].
            self._out += self._acks.ready(self._acks.expect(packet_id, 2))  # type: ignore[arg-type]
            return None
        # v5 announces the bound for both QoS; 3.1.1 has no receive maximum, so
        # only QoS 2 messages never released are bounded (QoS 1 is paced by back-pressure).
        unacknowledged = len(self._qos2) + (len(self._acks) if self.version == MQTT_5 else 0)
        if unacknowledged >= RECEIVE_MAXIMUM:
            raise ProtocolViolation(
                "limit", f"over {RECEIVE_MAXIMUM} QoS 1/2 messages unacknowledged or never released (PUBREL)",
                ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
            )
        if qos == 2:
            self._qos2.add(packet_id)  # type: ignore[arg-type]
        return MessageReceived(publish, self._acks.expect(packet_id, qos))  # type: ignore[arg-type]

    # -- the broker's answers -----------------------------------------------------------------

    def accept(self, session: Session, session_present: bool, properties: Properties | None = None) -> None:
        """Send CONNACK success; resend what the session had in flight, then what it queued."""
        self._transition("accept")
        connect = self.connect
        assert connect is not None
        self.session = session
        session.connection = self
        session.away_since = None
        self._initial_expiry = connect.properties.session_expiry_interval or 0
        if self.version == MQTT_5:
            self.send_window = connect.properties.receive_maximum or 65535
            self.max_packet_to_client = connect.properties.maximum_packet_size
        self._out += codec.encode_connack(session_present, 0, version=self.version, properties=properties)
        released = session.released
        for packet_id, message in list(session.inflight.items()):  # [MQTT-4.4.0-1]
            if packet_id in released:
                self._out += codec.encode_pubrel(packet_id, version=self.version)
            else:
                self._write_publish(message, packet_id, dup=True)
        self.drain_queue()

    def refuse(self, reason: int) -> None:
        """Send a refusing CONNACK (``reason`` a v5 reason code; a 3.1.1 client gets its return code)."""
        self._transition("refuse")
        self._out += codec.encode_connack(False, codec.connack_code(reason, self.version), version=self.version)

    def disconnect(self, reason: int) -> None:
        """End the connection from our side; a v5 client is told why."""
        if self.state is State.CONNECTED:
            self._transition("disconnect")
            if self.version == MQTT_5:
                self._out += codec.encode_disconnect(reason, version=MQTT_5)
        self.state = State.CLOSED

    def acknowledge(self, ack: list, reason: int = 0) -> None:
        """The message ``ack`` came with is handled; ``reason`` a v5 failure code if it was refused."""
        if self.state is State.CLOSED:
            return
        self._out += self._acks.ready(ack, reason if self.version == MQTT_5 else 0)

    def send_suback(self, packet_id: int, codes: list[int]) -> None:
        if self.version != MQTT_5:
            codes = [code if code < 0x80 else 0x80 for code in codes]
        self._out += codec.encode_suback(packet_id, codes, version=self.version)

    def send_unsuback(self, packet_id: int, codes: list[int]) -> None:
        self._out += codec.encode_unsuback(packet_id, codes, version=self.version)

    def deliver(self, message: OutMessage) -> bool:
        """Send ``message`` now, or queue it in the session while the window is full; False if queued."""
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"deliver while {self.state.value}")
        session = self.session
        assert session is not None
        if message.qos == 0:
            self._write_publish(message, None)
            return True
        if len(session.inflight) >= self.send_window or session.queue:
            session.queue.append(message)
            return False
        packet_id = session.next_packet_id()
        session.inflight[packet_id] = message
        self._write_publish(message, packet_id)
        return True

    def drain_queue(self) -> None:
        """Send queued messages while the window has room."""
        session = self.session
        if session is None or self.state is not State.CONNECTED:
            return
        queue, inflight = session.queue, session.inflight
        while queue and len(inflight) < self.send_window:
            message = queue.popleft()
            if message.qos == 0:
                self._write_publish(message, None)
                continue
            packet_id = session.next_packet_id()
            inflight[packet_id] = message
            self._write_publish(message, packet_id)

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call, as one write."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def pending_output(self) -> int:
        return len(self._out)

    # -- inside ---------------------------------------------------------------------------------

    def _write_publish(self, message: OutMessage, packet_id: int | None, dup: bool = False) -> None:
        data = codec.encode_publish(message.topic, message.payload, message.qos if packet_id else 0, message.retain,
                                    packet_id, dup, version=self.version, properties=message.properties)
        limit = self.max_packet_to_client
        if limit is not None and len(data) > limit:  # [MQTT-3.1.2-25]: not sent, as if delivered
            if packet_id is not None and self.session is not None:
                self.session.inflight.pop(packet_id, None)
            return
        self._out += data

    def _release(self, packet_id: int) -> None:
        """The client acknowledged ``packet_id`` for good (PUBACK, PUBCOMP): its window slot is free."""
        session = self.session
        if session is None:
            return
        session.released.discard(packet_id)
        if session.inflight.pop(packet_id, None) is not None and session.queue:
            self.drain_queue()

    def _received_by_client(self, packet_id: int, reason: int) -> None:
        """A PUBREC: the client has our QoS 2 message; answer PUBREL and wait for its PUBCOMP.

        A v5 PUBREC with a failure code ends that message's flow: no PUBREL [MQTT-4.3.3-4].
        """
        session = self.session
        if reason >= 0x80:
            self._release(packet_id)
            return
        if session is not None and packet_id in session.inflight:
            session.released.add(packet_id)
            code = 0
        else:
            code = 0 if self.version != MQTT_5 else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
        self._out += codec.encode_pubrel(packet_id, code, version=self.version)

    def _transition(self, what: str) -> None:
        next_state = TRANSITIONS.get((self.state, what))
        if next_state is None:
            raise LocalProtocolError(f"{what} while {self.state.value}")
        self.state = next_state

    def _violated(self, violation: ProtocolViolation) -> None:
        if self.version == MQTT_5:
            if self.state is State.CONNECTED:
                self._out += codec.encode_disconnect(violation.code, version=MQTT_5)
        if isinstance(violation, codec.UnsupportedProtocol):
            self._out += codec.encode_refusal_for(violation.level)
        self.state = State.CLOSED

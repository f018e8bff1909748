"""MQTT 3.1.1 framing, sans-IO: bytes in, checked frames out; packets to bytes.

Theory of operation
-------------------
An MQTT stream is a sequence of frames: one byte of type and flags, a
"remaining length" (1-4 bytes, 7 bits each), then that many bytes of body.
:class:`FrameSplitter` cuts a byte stream into frames and refuses a frame
whose declared length is over the limit *before* buffering its body, so a
client cannot make the agent hold a 256 MB packet in memory.

:func:`check_client_frame` is the server's view: which frames a client may
send, with which flags and sizes (section 2.2.2 and 3.x of the spec). The
embedded broker runs every frame through it before amqtt parses it, which
gives one place where malformed input is refused, logged and counted; amqtt
never sees a packet that would confuse its parser. The decoders and encoders
are what the agent needs for its own CONNECT handling and, in external-broker
mode, for being a client itself.

Nothing here does I/O or reads a clock; errors are :class:`ProtocolViolation`
with a ``reason`` ("malformed", "too_large", "protocol") for the metrics.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# Fixed-header flags a client must send per type (section 2.2.2); PUBLISH's vary.
_CLIENT_FLAGS = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}
_FIXED_BODY = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
MAX_TOPIC_BYTES = 65535

# CONNACK return codes (section 3.2.2.3).
ACCEPTED, BAD_PROTOCOL, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 1, 2, 3, 4, 5


MAX_FILTERS = 256  # topic filters in one SUBSCRIBE or UNSUBSCRIBE; a device needs a handful


class ProtocolViolation(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UnsupportedProtocol(ProtocolViolation):
    """A CONNECT of another MQTT version (``level``); answered in a form that version reads."""

    def __init__(self, level: int, detail: str) -> None:
        super().__init__("protocol", detail)
        self.level = level


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    body: bytes
    size: int  # header plus body, as on the wire


@dataclass(frozen=True, slots=True)
class Connect:
    protocol_level: int
    clean_session: bool
    keepalive: int
    client_id: str
    will_topic: str | None
    will_payload: bytes | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: bytes | None


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


class OrderedAcks:
    """Acknowledgements of inbound QoS 1/2 PUBLISH frames, released in arrival order.

    A receiver must acknowledge in the order the PUBLISH frames came
    [MQTT-4.6.0-2], but the agent finishes them out of order (telemetry at
    once, a KV write once durable): an acknowledgement waits for the ones
    before it.
    """

    def __init__(self) -> None:
        self._pending: deque[list] = deque()  # [packet id, qos, ready]

    def expect(self, packet_id: int, qos: int) -> list:
        entry = [packet_id, qos, False]
        self._pending.append(entry)
        return entry

    def ready(self, entry: list) -> bytes:
        """Mark ``entry`` done; the acknowledgement frames now due, in order."""
        entry[2] = True
        due = bytearray()
        pending = self._pending
        while pending and pending[0][2]:
            packet_id, qos, _ = pending.popleft()
            due += encode_puback(packet_id) if qos == 1 else encode_pubrec(packet_id)
        return bytes(due)


class FrameSplitter:
    """Cuts a byte stream into frames; ``max_body`` bounds what is buffered."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._start = 0  # frames before this offset are consumed

    def feed(self, data: bytes) -> None:
        # Compact once per feed rather than once per frame: a read carries
        # hundreds of small frames, and cutting each off the front is quadratic.
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        buffer, start = self._buffer, self._start
        if len(buffer) - start < 2:
            return None
        length, multiplier, index = 0, 1, start + 1
        while True:
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            if index - start == 5:
                raise ProtocolViolation("malformed", "remaining length longer than 4 bytes")
            multiplier *= 128
        if length > self.max_body:
            raise ProtocolViolation("too_large", f"a {length}-byte packet is over the {self.max_body}-byte limit")
        end = index + length
        if len(buffer) < end:
            return None
        frame = Frame(buffer[start] >> 4, buffer[start] & 0x0F, bytes(buffer[index:end]), end - start)
        self._start = end
        return frame

    @property
    def position(self) -> int:
        """Offset of the next frame; valid until the next :meth:`feed`."""
        return self._start

    def consumed_since(self, position: int) -> bytes:
        """The bytes of the frames taken since ``position``, exactly as they came."""
        return bytes(self._buffer[position : self._start])


def check_client_frame(frame: Frame, first: bool, max_payload: int) -> Publish | None:
    """Raise :class:`ProtocolViolation` unless a client may send ``frame`` here.

    Returns the decoded PUBLISH for a PUBLISH frame (it had to be decoded to
    check it), else None.
    """
    kind = frame.type
    if first != (kind == CONNECT):
        raise ProtocolViolation("malformed", "CONNECT must be the first packet, and only the first")
    if kind == PUBLISH:
        publish = decode_publish(frame)
        if len(publish.payload) > max_payload:
            raise ProtocolViolation(
                "too_large", f"a {len(publish.payload)}-byte payload on {publish.topic!r} is over the {max_payload}-byte limit"
            )
        return publish
    expected = _CLIENT_FLAGS.get(kind)
    if expected is None:
        raise ProtocolViolation("malformed", f"packet type {kind} is not one a client sends")
    if frame.flags != expected:
        raise ProtocolViolation("malformed", f"packet type {kind} with reserved flags {frame.flags:#x}")
    size = _FIXED_BODY.get(kind)
    if size is not None and len(frame.body) != size:
        raise ProtocolViolation("malformed", f"packet type {kind} with a {len(frame.body)}-byte body")
    if kind == SUBSCRIBE:
        decode_subscribe(frame.body)
    elif kind == UNSUBSCRIBE:
        decode_unsubscribe(frame.body)
    return None


# -- decoding ------------------------------------------------------------------------


class _Cursor:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def left(self) -> int:
        return len(self.body) - self.pos

    def take(self, n: int) -> bytes:
        if self.left() < n:
            raise ProtocolViolation("malformed", "packet ends inside a field")
        data = self.body[self.pos : self.pos + n]
        self.pos += n
        return data

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("malformed", f"{what} is not valid UTF-8") from None
        if "\x00" in text:
            raise ProtocolViolation("malformed", f"{what} contains NUL")
        return text


def decode_connect(frame: Frame) -> Connect:
    cursor = _Cursor(frame.body)
    name = cursor.text("protocol name")
    level = cursor.u8()
    if name != "MQTT" or level != 4:
        raise UnsupportedProtocol(level, f"protocol {name!r} level {level}; this broker speaks MQTT 3.1.1 (level 4)")
    flags = cursor.u8()
    if flags & 0x01:
        raise ProtocolViolation("malformed", "CONNECT reserved flag set")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3 or (not will and (will_qos or will_retain)) or (has_password and not has_user):
        raise ProtocolViolation("malformed", f"CONNECT flags {flags:#04x} are inconsistent")
    keepalive = cursor.u16()
    client_id = cursor.text("client id")
    will_topic = cursor.text("will topic") if will else None
    will_payload = cursor.binary() if will else None
    username = cursor.text("user name") if has_user else None
    password = cursor.binary() if has_password else None
    if cursor.left():
        raise ProtocolViolation("malformed", "CONNECT has trailing bytes")
    return Connect(level, bool(flags & 0x02), keepalive, client_id, will_topic, will_payload, will_qos, will_retain, username, password)


def decode_publish(frame: Frame) -> Publish:
    qos = (frame.flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("malformed", "PUBLISH with QoS 3")
    cursor = _Cursor(frame.body)
    topic = cursor.text("topic")
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolViolation("malformed", f"PUBLISH topic {topic!r} is empty or has a wildcard")
    packet_id = cursor.u16() if qos else None
    if packet_id == 0:
        raise ProtocolViolation("malformed", "PUBLISH packet id 0")
    payload = frame.body[cursor.pos :]
    return Publish(topic, payload, qos, bool(frame.flags & 0x01), bool(frame.flags & 0x08), packet_id)


def _packet_id(cursor: _Cursor, what: str) -> int:
    packet_id = cursor.u16()
    if packet_id == 0:
        raise ProtocolViolation("malformed", f"{what} packet id 0")  # [MQTT-2.3.1-1]
    return packet_id


def _more_filters(cursor: _Cursor, filters: list, what: str) -> bool:
    if len(filters) >= MAX_FILTERS and cursor.left():
        raise ProtocolViolation("limit", f"{what} with more than {MAX_FILTERS} topic filters")
    return bool(cursor.left())


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    cursor = _Cursor(body)
    packet_id = _packet_id(cursor, "SUBSCRIBE")
    filters: list[tuple[str, int]] = []
    while _more_filters(cursor, filters, "SUBSCRIBE"):
        topic_filter = cursor.text("topic filter")
        qos = cursor.u8()
        if not topic_filter or qos > 2:
            raise ProtocolViolation("malformed", f"SUBSCRIBE to {topic_filter!r} with QoS byte {qos:#x}")
        filters.append((topic_filter, qos))
    if not filters:
        raise ProtocolViolation("malformed", "SUBSCRIBE without a topic filter")
    return packet_id, filters


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    cursor = _Cursor(body)
    packet_id = _packet_id(cursor, "UNSUBSCRIBE")
    filters: list[str] = []
    while _more_filters(cursor, filters, "UNSUBSCRIBE"):
        filters.append(cursor.text("topic filter"))
    if not filters:
        raise ProtocolViolation("malformed", "UNSUBSCRIBE without a topic filter")
    return packet_id, filters


def decode_connack(frame: Frame) -> tuple[bool, int]:
    if frame.type != CONNACK or len(frame.body) != 2:
        raise ProtocolViolation("malformed", "expected a CONNACK")
    return bool(frame.body[0] & 0x01), frame.body[1]


def decode_packet_id(frame: Frame) -> int:
    return _Cursor(frame.body).u16()


# -- encoding ------------------------------------------------------------------------


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
    keepalive: int = 60,
    clean_session: bool = True,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _text(client_id)
    if username is not None:
        body += _text(username)
    if password is not None:
        body += _text(password)
    return _frame(CONNECT << 4, body)


def encode_connack(session_present: bool, code: int) -> bytes:
    return _frame(CONNACK << 4, bytes([1 if session_present and code == ACCEPTED else 0, code]))


def encode_publish(topic: str, payload: bytes, qos: int = 0, retain: bool = False, packet_id: int | None = None, dup: bool = False) -> bytes:
    header = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = _text(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _frame(header, body)


def encode_refusal_for(level: int) -> bytes:
    """The CONNACK refusing a CONNECT of protocol ``level``, in the form that version parses.

    MQTT 5 (level 5) reads a reason code and a properties length: 0x84,
    "unsupported protocol version". Earlier levels read the 3.1.1 form, code 1.
    """
    if level == 5:
        return _frame(CONNACK << 4, bytes([0, 0x84, 0]))
    return encode_connack(False, BAD_PROTOCOL)


def encode_puback(packet_id: int) -> bytes:
    return _frame(PUBACK << 4, struct.pack("!H", packet_id))


def encode_pubrec(packet_id: int) -> bytes:
    return _frame(PUBREC << 4, struct.pack("!H", packet_id))


def encode_pubcomp(packet_id: int) -> bytes:
    return _frame(PUBCOMP << 4, struct.pack("!H", packet_id))


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_text(f) + bytes([qos]) for f, qos in filters)
    return _frame((SUBSCRIBE << 4) | 0x02, body)


def encode_pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def encode_disconnect() -> bytes:
    return bytes([DISCONNECT << 4, 0])

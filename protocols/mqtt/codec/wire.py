"""MQTT's data representations (section 1.5) and frame splitting, both directions.

An MQTT stream is a sequence of frames: one byte of type and flags, a
"remaining length" (a variable byte integer, 1-4 bytes), then that many bytes
of body. :class:`FrameSplitter` cuts a byte stream into frames and refuses a
frame whose declared length is over the limit *before* buffering its body, so
a peer cannot make us hold a 256 MB packet in memory. :class:`Cursor` reads
the fields of a body; the ``pack_*`` functions write them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .spec import ProtocolViolation

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class Frame:
    """One packet as cut from the stream, not yet decoded."""

    type: int
    flags: int
    body: bytes
    size: int  # header plus body, as on the wire


class FrameSplitter:
    """Cuts a byte stream into frames; ``max_body`` bounds what is buffered."""

    __slots__ = ("max_body", "_buffer", "_start")

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
        available = len(buffer)
        if available - start < 2:
            return None
        length, shift, index = 0, 0, start + 1
        while True:
            if index >= available:
                return None
            byte = buffer[index]
            length |= (byte & 0x7F) << shift
            index += 1
            if not byte & 0x80:
                break
            if index - start == 5:
                raise ProtocolViolation("malformed", "remaining length longer than 4 bytes")
            shift += 7
        if length > self.max_body:
            raise ProtocolViolation("too_large", f"a {length}-byte packet is over the {self.max_body}-byte limit")
        end = index + length
        if available < end:
            return None
        header = buffer[start]
        frame = Frame(header >> 4, header & 0x0F, bytes(buffer[index:end]), end - start)
        self._start = end
        return frame

    @property
    def position(self) -> int:
        """Offset of the next frame; valid until the next :meth:`feed`."""
        return self._start

    def consumed_since(self, position: int) -> bytes:
        """The bytes of the frames taken since ``position``, exactly as they came."""
        return bytes(self._buffer[position : self._start])


class Cursor:
    """Reads the fields of one packet body; running off its end is malformed."""

    __slots__ = ("body", "pos", "end")

    def __init__(self, body: bytes, pos: int = 0, end: int | None = None) -> None:
        self.body = body
        self.pos = pos
        self.end = len(body) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        pos = self.pos
        if self.end - pos < n:
            raise ProtocolViolation("malformed", "packet ends inside a field")
        self.pos = pos + n
        return self.body[pos : pos + n]

    def rest(self) -> bytes:
        data = self.body[self.pos : self.end]
        self.pos = self.end
        return data

    def u8(self) -> int:
        if self.pos >= self.end:
            raise ProtocolViolation("malformed", "packet ends inside a field")
        self.pos += 1
        return self.body[self.pos - 1]

    def u16(self) -> int:
        if self.end - self.pos < 2:
            raise ProtocolViolation("malformed", "packet ends inside a field")
        value = _U16.unpack_from(self.body, self.pos)[0]
        self.pos += 2
        return value

    def u32(self) -> int:
        if self.end - self.pos < 4:
            raise ProtocolViolation("malformed", "packet ends inside a field")
        value = _U32.unpack_from(self.body, self.pos)[0]
        self.pos += 4
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise ProtocolViolation("malformed", "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("malformed", f"{what} is not valid UTF-8") from None
        if "\x00" in text:  # [MQTT-1.5.3-2]
            raise ProtocolViolation("malformed", f"{what} contains U+0000")
        return text


def pack_varint(value: int) -> bytes:
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pack_u16(value: int) -> bytes:
    return _U16.pack(value)


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def pack_binary(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def pack_text(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _U16.pack(len(raw)) + raw


def pack_frame(header: int, body: bytes) -> bytes:
    """A fixed header (type and flags in ``header``) and the remaining length before ``body``."""
    length = len(body)
    if length < 128:
        return bytes((header, length)) + body
    return bytes((header,)) + pack_varint(length) + body

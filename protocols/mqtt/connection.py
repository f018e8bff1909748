"""One device connection of the embedded broker, as amqtt reads it (asyncio side).

amqtt reads its connections through a ``ReaderAdapter``; :class:`DeviceConnection`
is that adapter, standing between the socket and amqtt:

- every frame is checked (``codec.check_client_frame``) before amqtt sees
  it; a malformed or oversized frame is refused, counted and the connection
  closed, as MQTT 3.1.1 requires. Other clients never notice;
- the CONNECT is read here first so the agent can admit or refuse the device
  before amqtt touches its session (amqtt 0.12 authenticates only after it
  has dropped or taken over the stored session of that client id, so a wrong
  password could otherwise disconnect the real device);
- a device's PUBLISH frames are for the agent, never relayed device to device
  (the contract has no such topic), so they are handed to the agent here and
  acknowledged here: PUBACK/PUBREC once the agent is done (a KV write: once
  durable), in the order the PUBLISH frames came [MQTT-4.6.0-2]. amqtt handles
  the rest: sessions, subscriptions, deliveries, wills, pings;
- silence past 1.5 times the keep-alive closes the connection (amqtt 0.12 does
  not), so a device that lost power is marked offline and its Will sent;
- while the agent's queue is over its high-water mark, reading pauses, which
  pushes back on the sender through TCP instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.adapters import ReaderAdapter

from . import codec
from .acks import OrderedAcks
from .codec import Connect, FrameSplitter, ProtocolViolation

log = logging.getLogger("konsul.mqtt")

READ_SIZE = 65536
CONNECT_TIMEOUT = 10.0
MAX_UNSENT = 16 * 1024 * 1024  # bytes queued for a device that does not read
# QoS 2 messages acknowledged with PUBREC and awaiting their PUBREL; a client
# that never releases them is cut off rather than remembered without end.
MAX_QOS2_PENDING = 1024


class DeviceConnection(ReaderAdapter):
    """The checked byte stream of one device connection.

    Args:
        reader, writer: the accepted socket.
        agent: the gateway port (see ``boundary.AgentPort``).
        drained: set whenever the agent's queue is below its high-water mark.
        peer: ``host:port`` of the device, for logs and presence.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agent: Any, drained: asyncio.Event, peer: str) -> None:
        self.reader = reader
        self.writer = writer
        self.agent = agent
        self.drained = drained
        self.peer = peer
        self.device_id = ""
        self.connect: Connect | None = None
        self.max_payload = agent.max_payload
        self._splitter = FrameSplitter(self.max_payload + codec.MAX_TOPIC_BYTES + 8)
        self._ready = bytearray()  # checked bytes amqtt has not read yet
        self._pos = 0
        self._loop = asyncio.get_running_loop()
        self._deadline: float | None = None
        self._idle_limit: float | None = None
        self._acks = OrderedAcks()
        self._qos2: set[int] = set()  # QoS 2 packet ids handled, awaiting PUBREL
        # QoS 1 messages the agent sent here itself (broker.py); their PUBACKs end here.
        self.ours: set[int] = set()
        self.inflight: dict[int, Any] = {}  # the amqtt session's outgoing in-flight table
        self._acks_due = bytearray()  # acknowledgements to write at the end of this loop turn
        self.closed = False

    @property
    def who(self) -> str:
        return f"{self.device_id or '?'}@{self.peer}"

    async def handshake(self) -> Connect | None:
        """The checked CONNECT, left in the stream for amqtt; None if there was none."""
        self._deadline = self._loop.time() + CONNECT_TIMEOUT
        while self.connect is None:
            if not await self._fill():
                return None
        return self.connect

    def admitted(self) -> None:
        assert self.connect is not None
        self.device_id = self.connect.client_id
        if self.connect.keepalive:
            self._idle_limit = 1.5 * self.connect.keepalive
            self._deadline = self._loop.time() + self._idle_limit
        else:
            self._deadline = None

    def refuse_connect(self, code: int) -> None:
        self.writer.write(codec.encode_connack(False, code))
        self.close()

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def send(self, data: bytes) -> None:
        """Write frames for the device; a device that stops reading is cut off, not buffered for."""
        if self.closed:
            return
        if self.writer.transport.is_closing():
            # The device hung up (half-closed or gone) before, say, a PUBACK
            # whose write became durable after it left: nobody to tell.
            self.closed = True
            return
        try:
            self.writer.write(data)
        except (RuntimeError, ConnectionError) as error:  # "write() after write_eof()", a reset
            log.debug("dropping %d bytes for %s: %s", len(data), self.who, error)
            self.closed = True
            return
        if self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
            self.agent.refusals.refuse("overload", self.who, f"not reading: over {MAX_UNSENT} bytes unsent")
            self.writer.transport.abort()
            self.closed = True

    # -- ReaderAdapter ------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        while len(self._ready) - self._pos < max(n, 1):
            if not await self._fill():
                break
        end = len(self._ready) if n < 0 else min(self._pos + n, len(self._ready))
        data = bytes(self._ready[self._pos : end])
        self._pos = end
        if self._pos == len(self._ready):
            self._ready.clear()
            self._pos = 0
        return data

    def feed_eof(self) -> None:
        self.reader.feed_eof()

    # -- checking --------------------------------------------------------------------

    async def _fill(self) -> bool:
        """Pass on more checked frames; False at the end of the stream."""
        if self.closed:
            return False
        if self._splitter.buffered and self._drain():
            return True  # frames that came with the CONNECT, before admission
        if not self.drained.is_set():
            await self.drained.wait()
            if self._idle_limit is not None:  # our pause is not the device's silence
                self._deadline = self._loop.time() + self._idle_limit
        try:
            if self._deadline is None:
                data = await self.reader.read(READ_SIZE)
            else:
                # The deadline is absolute: amqtt cancels and restarts reads on
                # its own keep-alive timer, which must not push it back.
                async with asyncio.timeout_at(self._deadline):
                    data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            what = "no CONNECT" if self.connect is None else f"silent for {self._idle_limit:g}s (1.5x keep-alive)"
            self.agent.refusals.refuse("timeout", self.who, what)
            self.close()
            return False
        except (ConnectionError, OSError):
            self.close()
            return False
        if not data:
            return False
        if self._idle_limit is not None:
            self._deadline = self._loop.time() + self._idle_limit
        self._splitter.feed(data)
        self._drain()
        if self.agent.congested():
            self.drained.clear()  # every device connection pauses until the agent catches up
        return not self.closed or bool(len(self._ready) - self._pos)

    def _drain(self) -> bool:
        """Take the complete frames buffered; True if any was taken."""
        splitter = self._splitter
        first = splitter.position
        try:
            while not (self.connect is not None and not self.device_id):  # stop after CONNECT until admitted
                start = splitter.position
                frame = splitter.next_frame()
                if frame is None:
                    break
                if self._take(frame):
                    self._ready += splitter.consumed_since(start)
        except ProtocolViolation as violation:
            self.agent.refusals.refuse(violation.reason, self.who, str(violation))
            if isinstance(violation, codec.UnsupportedProtocol):
                self.writer.write(codec.encode_refusal_for(violation.level))
            self.close()
            return True
        return splitter.position != first

    def _take(self, frame: codec.Frame) -> bool:
        """Check one frame; True to pass it on to amqtt."""
        if self.connect is None:
            check_client_frame(frame, first=True, max_payload=self.max_payload)
            self.connect = codec.decode_connect(frame)
            if self.connect.protocol_level != codec.MQTT_311:  # amqtt reads 3.1.1 only
                raise codec.UnsupportedProtocol(self.connect.protocol_level, "MQTT 5 is not served by this broker yet")
            return True
        publish = check_client_frame(frame, first=False, max_payload=self.max_payload)
        if publish is not None:
            self._publish(publish)
            return False
        if frame.type == codec.PUBACK and self.ours:
            packet_id = codec.decode_packet_id(frame)
            if packet_id in self.ours:
                self.ours.discard(packet_id)
                self.inflight.pop(packet_id, None)
                return False
            return True
        if frame.type == codec.PUBREL:
            # Inbound QoS 2 ends here too; answer unknown ids as well [MQTT-4.3.3-1].
            packet_id = codec.decode_packet_id(frame)
            self._qos2.discard(packet_id)
            self.send(codec.encode_pubcomp(packet_id))
            return False
        return True

    def _publish(self, publish: codec.Publish) -> None:
        # A '$' topic is the broker's: refused, but acknowledged like any
        # refused message (docs/mqtt.md), so the client does not resend it.
        dropped = publish.topic.startswith("$")
        if dropped:
            self.agent.refusals.refuse("topic", self.who, f"PUBLISH to {publish.topic!r}: '$' topics belong to the broker; dropped")
        if publish.qos == 0:
            if not dropped:
                self.agent.received(self.device_id, publish, self.who, None)
            return
        resent = publish.qos == 2 and publish.packet_id in self._qos2
        if publish.qos == 2 and not resent and len(self._qos2) >= MAX_QOS2_PENDING:
            raise ProtocolViolation("limit", f"over {MAX_QOS2_PENDING} QoS 2 messages received and never released (PUBREL)")
        entry = self._acks.expect(publish.packet_id, publish.qos)
        if resent or dropped:
            self._settle(entry, True)  # a resend before PUBREL: handled already, acknowledge again
            if publish.qos == 2:
                self._qos2.add(publish.packet_id)
            return
        if publish.qos == 2:
            self._qos2.add(publish.packet_id)
        self.agent.received(self.device_id, publish, self.who, lambda ok: self._settle(entry, ok))

    def _settle(self, entry: list, ok: bool) -> None:
        if self.closed:
            return
        if not ok:
            # Not acknowledged: closing makes the client resend after it reconnects.
            self.close()
            return
        due = self._acks.ready(entry)
        if due:
            # One write per loop turn, not per message: a batch settles together.
            if not self._acks_due:
                self._loop.call_soon(self._write_acks)
            self._acks_due += due

    def _write_acks(self) -> None:
        due, self._acks_due = bytes(self._acks_due), bytearray()
        self.send(due)


def check_client_frame(frame: codec.Frame, first: bool, max_payload: int) -> codec.Publish | None:
    """Raise :class:`ProtocolViolation` unless a 3.1.1 client may send ``frame`` here.

    Returns the decoded PUBLISH for a PUBLISH frame (it had to be decoded to
    check it), else None.
    """
    if first != (frame.type == codec.CONNECT):
        raise ProtocolViolation("malformed", "CONNECT must be the first packet, and only the first")
    if first:
        return None
    if frame.type not in codec.FROM_CLIENT or frame.type == codec.AUTH:
        raise ProtocolViolation("malformed", f"packet type {frame.type} is not one a client sends")
    packet = codec.decode(frame)
    if isinstance(packet, codec.Publish):
        if len(packet.payload) > max_payload:
            raise ProtocolViolation(
                "too_large", f"a {len(packet.payload)}-byte payload on {packet.topic!r} is over the {max_payload}-byte limit"
            )
        return packet
    return None

"""A simulated device over MQTT 3.1.1, on trio: one TCP connection and two tasks per device.

Per connection the device sends CONNECT (client id = device id, user name =
device id and password = token unless anonymous, Last Will ``offline``
retained on its status topic), subscribes to its desired topic, reports its
state, resends the samples the agent has not acknowledged yet, and then runs
two tasks: a reader (acknowledgements, desired state, ping responses) and a
driver that sends samples at the device's interval, pings when idle and
drops the connection at random. A random drop is either a clean DISCONNECT
(no Will) or a bare close, after which the agent publishes the Will.

Samples go at QoS 1; a PUBACK means the agent has stored the sample. At
most ``MAX_UNACKED`` samples wait for their PUBACK; while that many wait, a
device takes no new samples (counted as throttled), as a device with a
small buffer would.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio

from konsul.protocols.mqtt import codec  # the one MQTT codec; it imports nothing of the agent

from .device import Counts, SimDevice

KEEPALIVE = 60  # seconds
CONNECT_TIMEOUT = 10.0
MAX_UNACKED = 32
# The agent never sends a device more than this (a desired state is small);
# anything larger means the stream is not MQTT or is corrupt.
MAX_INBOUND_BODY = 1 << 20


class MqttError(Exception):
    """The agent refused the device, or stopped making sense."""


LOST_CONNECTION = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, MqttError,
                   codec.ProtocolViolation)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class MqttSession:
    """One connection of one device; ends by raising, or by returning after a random drop."""

    def __init__(self, device: SimDevice, stream: trio.SocketStream, counters: Counts) -> None:
        self.device = device
        self.stream = stream
        self.counters = counters
        self.reader = codec.FrameSplitter(MAX_INBOUND_BODY)
        self.send_lock = trio.Lock()
        self.topic = f"konsul/v1/devices/{device.device_id}/"
        self.inflight: dict[int, int | None] = {}  # packet id -> sample seq (None: not a sample)
        self.next_packet_id = 0
        self.last_sent = trio.current_time()
        self.last_received = self.last_sent
        self.interval_changed = trio.Event()

    # -- wire --------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)
        self.last_sent = trio.current_time()

    async def receive(self) -> list[codec.Packet]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise MqttError("the agent closed the connection")
        self.last_received = trio.current_time()
        self.reader.feed(data)
        packets = []
        while (frame := self.reader.next_frame()) is not None:
            packets.append(codec.decode(frame))
        return packets

    def packet_id(self, seq: int | None) -> int:
        while True:
            self.next_packet_id = self.next_packet_id % 65535 + 1
            if self.next_packet_id not in self.inflight:
                self.inflight[self.next_packet_id] = seq
                return self.next_packet_id

    async def publish(self, leaf: str, payload: bytes, seq: int | None = None) -> None:
        await self.send(codec.encode_publish(self.topic + leaf, payload, 1, packet_id=self.packet_id(seq)))

    # -- phases ------------------------------------------------------------------------

    async def handshake(self) -> None:
        device = self.device
        anonymous = device.token is None
        await self.send(
            codec.encode_connect(
                device.device_id,
                keepalive=KEEPALIVE,
                username=None if anonymous else device.device_id,
                password=device.token,
                will=(self.topic + "status", b"offline", 1, True),
            )
        )
        with trio.fail_after(CONNECT_TIMEOUT):
            while True:
                for packet in await self.receive():
                    if not isinstance(packet, codec.Connack):
                        raise MqttError(f"expected CONNACK, got {packet!r}")
                    if packet.reason_code:
                        raise MqttError(f"the agent refused the connection (CONNACK {packet.reason_code})")
                    return

    async def start(self) -> None:
        """After CONNACK: subscribe, report, resend what the agent has not acknowledged."""
        self.next_packet_id += 1
        self.inflight[self.next_packet_id] = None
        await self.send(codec.encode_subscribe(self.next_packet_id, [(self.topic + "desired", 1)]))
        await self.publish("reported", _json(self.device.initial_report()))
        self.counters.reported_sent += 1
        for seq, payload in list(self.device.unacked.items()):
            await self.publish("telemetry", payload, seq)
            self.counters.samples_resent += 1

    async def read_loop(self) -> None:
        while True:
            for packet in await self.receive():
                if isinstance(packet, codec.Ack) and packet.type == codec.PUBACK:
                    self.acknowledged(packet.packet_id)
                elif isinstance(packet, codec.Publish):
                    await self.on_publish(packet)
                elif isinstance(packet, codec.Suback):
                    self.inflight.pop(packet.packet_id, None)
                    if packet.reason_codes == [0x80]:
                        raise MqttError("the agent refused the subscription to desired state")
                elif packet is not codec.PING_RESPONSE:
                    raise MqttError(f"unexpected {packet!r} from the agent")

    def acknowledged(self, packet_id: int) -> None:
        seq = self.inflight.pop(packet_id, None)
        if seq is not None and self.device.unacked.pop(seq, None) is not None:
            self.counters.samples_acked += 1

    async def on_publish(self, message: codec.Publish) -> None:
        if message.packet_id is not None:
            await self.send(codec.encode_puback(message.packet_id))
        if message.topic != self.topic + "desired" or not message.payload:
            return
        try:
            desired = json.loads(message.payload)
        except ValueError:
            self.counters.failed(self.device.device_id, "desired state is not JSON")
            return
        reported, interval_changed = self.device.follow_desired(desired, self.counters)
        if reported is None:
            return
        if interval_changed:
            self.interval_changed.set()
        await self.publish("reported", _json(reported))
        self.counters.reported_sent += 1

    async def drive(self) -> None:
        """Samples, pings and the random drop; returns when the device drops the connection."""
        device, counters = self.device, self.counters
        now = trio.current_time()
        next_sample = now + device.rng.uniform(0, device.interval)  # spread the fleet's samples
        drop_at = now + device.disconnect_after()
        while True:
            ping_at = self.last_sent + KEEPALIVE * 0.75
            if self.last_received < self.last_sent - KEEPALIVE / 2:
                raise MqttError("the agent stopped answering")
            wake = min(next_sample, ping_at, drop_at)
            if not math.isinf(wake):
                with trio.move_on_at(wake):
                    await self.interval_changed.wait()
            now = trio.current_time()
            if self.interval_changed.is_set():
                self.interval_changed = trio.Event()
                next_sample = min(next_sample, now + device.interval)
                continue
            if now >= drop_at:
                counters.random_disconnects += 1
                if device.rng.random() < 0.5:
                    await self.send(codec.DISCONNECT_BYTES)  # clean: the agent discards the Will
                return
            if now >= next_sample:
                next_sample = max(next_sample + device.interval, now)
                if len(device.unacked) >= MAX_UNACKED:
                    counters.samples_throttled += 1
                    continue
                sample = device.next_sample()
                payload = _json(sample)
                device.unacked[sample["seq"]] = payload
                await self.publish("telemetry", payload, sample["seq"])
                counters.samples_sent += 1
            elif now >= ping_at:
                await self.send(codec.PINGREQ_BYTES)


async def run_mqtt_device(
    device: SimDevice, host: str, port: int, counters: Counts, connecting: trio.CapacityLimiter
) -> None:
    """Keep ``device`` connected over MQTT until cancelled, reconnecting with backoff."""
    while True:
        try:
            async with connecting:
                stream = await trio.open_tcp_stream(host, port)
            async with stream:
                session = MqttSession(device, stream, counters)
                async with connecting:
                    await session.handshake()
                with device.online(counters):
                    await session.start()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(session.read_loop)
                        await session.drive()
                        nursery.cancel_scope.cancel()
        except* LOST_CONNECTION as group:
            exc = _first_leaf(group)
            counters.failed(device.device_id, f"mqtt: {str(exc) or type(exc).__name__}")
        await trio.sleep(device.backoff())
        counters.reconnects += 1

"""External-broker mode: the agent as an MQTT client of an existing broker (trio).

``--mqtt-broker mqtt://[user:password@]host:port`` makes the agent attach to a
broker such as mosquitto instead of embedding one; ``mqtts://`` over TLS
(trio's ``SSLStream``), the broker's certificate checked against
``--mqtt-broker-ca`` or else the system's CAs. The topic contract is the
same; the broker authenticates devices and enforces its own ACLs (MQTT 3.1.1
does not tell a subscriber who published a message, so the agent can check
topics and payloads but not device allowances; docs/mqtt.md has a mosquitto
ACL that mirrors the embedded rules).

The client is ours, on trio, built on the sans-IO ``codec`` package: it needs
only CONNECT, SUBSCRIBE, PUBLISH at QoS 0/1 and pings, and owning it keeps
asyncio out of this mode and reconnection inside the agent's nursery.

Three things make a client-side gateway correct:

- **Retained replays are not writes.** On every (re)connect the broker replays
  its retained ``konsul/v1/kv/...`` messages (retain flag set). They may be
  stale (the store moved on while the agent was away), so they are never
  applied; instead the agent publishes the store's every key, and clears
  retained topics whose key the store does not have. Only live messages
  (retain flag clear) are writes.
- **Our own publishes come back.** The agent subscribes to ``konsul/v1/kv/#``
  and so receives what it publishes there. MQTT 3.1.1 has no "no local"
  option, so each publish is remembered per topic, and the first live message
  on that topic carrying the same payload is taken as its echo. The broker
  keeps one publisher's messages in order, so echoes arrive in order.
- **Acknowledge after handling.** A QoS 1 delivery is acknowledged once the
  agent is done with it (a KV write: durable), in arrival order.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import trio

from konsul.protocols.gateway import GatewayContext

from . import codec
from .acks import OrderedAcks
from .core import Done, MqttGateway, Outgoing
from .codec import FrameSplitter, Publish
from .topics import DEVICES, KV

log = logging.getLogger("konsul.mqtt")

SUBSCRIPTIONS = [
    (DEVICES + "+/telemetry", 1),
    (DEVICES + "+/reported", 1),
    (DEVICES + "+/status", 1),
    (KV + "#", 1),
]
KEEPALIVE = 30
CONNECT_TIMEOUT = 10.0
RETRY_MIN, RETRY_MAX = 0.5, 30.0
# What ends a session and makes the link try again (anything else is a bug and propagates).
LINK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, codec.ProtocolViolation)
MAX_ECHOES = 10_000  # per topic; past this the broker is not echoing and we stop waiting


TLS_SCHEMES = ("mqtts", "ssl")


def parse_broker_url(url: str) -> tuple[str, int, str | None, str | None]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", *TLS_SCHEMES) or not parts.hostname:
        shown = f"{parts.scheme}://{parts.hostname or ''}"  # never echo a password
        raise ValueError(f"--mqtt-broker must be mqtt[s]://[user:password@]host[:port], got {shown!r}...")
    return parts.hostname, parts.port or (8883 if parts.scheme in TLS_SCHEMES else 1883), parts.username, parts.password


class BrokerLink:
    """One connection at a time to the external broker, re-established on loss."""

    def __init__(self, gateway: MqttGateway, url: str, client_id: str, ca: str = "") -> None:
        """``ca``: with ``mqtts://``, the only CA the broker's certificate may chain to (else the system's)."""
        self.gateway = gateway
        self.url = url
        self.host, self.port, self.username, self.password = parse_broker_url(url)
        self.scheme = "mqtts" if urlsplit(url).scheme in TLS_SCHEMES else "mqtt"
        self.tls: ssl.SSLContext | None = None
        if self.scheme == "mqtts":
            from konsul.protocols.tls import client_context

            self.tls = client_context(Path(ca) if ca else None)  # a bad CA file stops start-up here
        elif ca:
            raise ValueError("--mqtt-broker-ca is for an mqtts:// broker")
        self.client_id = client_id
        self.who = f"broker {self.host}:{self.port}"
        self._out: trio.MemorySendChannel[bytes] | None = None
        self._acks = OrderedAcks()
        self._echoes: dict[str, deque[bytes]] = {}
        self._packet_id = 0
        self._subscribed = trio.Event()
        self._session_scope = trio.CancelScope()

    # -- Outlet ------------------------------------------------------------------------

    async def send(self, messages: list[Outgoing]) -> None:
        if self._out is None:
            return  # not connected: the next session republishes the whole state
        for message in messages:
            self._publish(message)

    async def settle(self, results: list[tuple[Done, bool]]) -> None:
        for done, ok in results:
            done(ok)  # an external broker's client: no reason codes to give

    async def kick(self, device_id: str, keep_token_hash: str | None = None, why: str = "device deleted") -> None:
        log.warning("device %s: %s; the external broker's ACL must shut its old credentials out", device_id, why)

    # -- the connection ----------------------------------------------------------------

    async def run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                stream = await self._open()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as error:
                log.warning("cannot reach the MQTT broker %s:%s (%s); retrying in %gs", self.host, self.port,
                            _why(error), delay)
            else:
                try:
                    async with stream:
                        await self._session(stream)
                except* LINK_ERRORS as group:
                    error = group.exceptions[0]
                    log.warning("lost the MQTT broker %s:%s (%s); reconnecting", self.host, self.port, error)
                    if self._subscribed.is_set():  # it had worked: try again soon
                        delay = RETRY_MIN
                finally:
                    self._out = None
                    self.gateway.broker_lost()
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _open(self) -> trio.abc.Stream:
        """A connection to the broker; with TLS, past the handshake (the certificate checked)."""
        stream = await trio.open_tcp_stream(self.host, self.port)
        if self.tls is None:
            return stream
        tls = trio.SSLStream(stream, self.tls, server_hostname=self.host)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    async def _session(self, stream: trio.abc.Stream) -> None:
        out_send, out_receive = trio.open_memory_channel[bytes](math.inf)
        self._acks = OrderedAcks()
        self._echoes.clear()
        self._subscribed = trio.Event()
        splitter = FrameSplitter(max_body=256 * 1024 * 1024)
        await stream.send_all(
            codec.encode_connect(self.client_id, keepalive=KEEPALIVE, username=self.username, password=self.password)
        )
        with trio.fail_after(CONNECT_TIMEOUT):
            frame = await _next_frame(stream, splitter)
        connack = codec.decode(frame) if frame.type == codec.CONNACK else None
        if not isinstance(connack, codec.Connack):
            raise codec.ProtocolViolation("protocol", "expected a CONNACK")
        code = connack.reason_code
        if code != codec.ACCEPTED:
            raise ConnectionError(f"the broker refused the connection (CONNACK {code})")
        async with trio.open_nursery() as nursery:
            self._session_scope = nursery.cancel_scope
            nursery.start_soon(self._writer, stream, out_receive)
            nursery.start_soon(self._pinger, out_send)
            self._out = out_send
            out_send.send_nowait(codec.encode_subscribe(self._next_id(), SUBSCRIPTIONS))
            nursery.start_soon(self._reader, stream, splitter)
            with trio.fail_after(CONNECT_TIMEOUT):
                await self._subscribed.wait()
            log.info("mqtt attached to the external broker %s:%s as %s%s", self.host, self.port, self.client_id,
                     " (TLS)" if self.tls is not None else "")
            # The broker may hold stale retained state: bring it up to date.
            await self.send(self.gateway.kv_messages())
            await self.send([Outgoing(f"{DEVICES}{d}/desired", p, True, "desired") for d, p in self.gateway.desired.items()])

    async def _writer(self, stream: trio.abc.Stream, outbox: trio.MemoryReceiveChannel[bytes]) -> None:
        async for data in outbox:
            chunks = [data]
            while True:  # coalesce what queued meanwhile into one write
                try:
                    chunks.append(outbox.receive_nowait())
                except trio.WouldBlock:
                    break
            await stream.send_all(b"".join(chunks))

    async def _pinger(self, out: trio.MemorySendChannel[bytes]) -> None:
        while True:
            await trio.sleep(KEEPALIVE / 2)
            out.send_nowait(codec.encode_pingreq())

    async def _reader(self, stream: trio.abc.Stream, splitter: FrameSplitter) -> None:
        while True:
            # The broker answers a ping within the keep-alive; silence means a dead link.
            with trio.fail_after(KEEPALIVE * 1.5):
                frame = await _next_frame(stream, splitter)
            if frame.type == codec.PUBLISH:
                self._delivered(codec.decode_publish(frame))
            elif frame.type == codec.SUBACK:
                if any(code >= 0x80 for code in codec.decode(frame).reason_codes):
                    raise ConnectionError(f"the broker refused a subscription to {SUBSCRIPTIONS} (check its ACL)")
                self._subscribed.set()
            elif frame.type == codec.PUBREL:  # not expected at QoS 1, answered anyway
                self._out.send_nowait(codec.encode_pubcomp(codec.decode_packet_id(frame)))

    # -- messages ----------------------------------------------------------------------

    def _delivered(self, publish: Publish) -> None:
        entry = self._acks.expect(publish.packet_id, publish.qos) if publish.qos else None
        done = (lambda ok, _reason=0: self._settle(entry, ok)) if entry is not None else None
        if publish.retain:
            # A replay of the broker's retained copy: state, never news.
            if publish.topic.startswith(KV):
                self._check_replayed(publish)
            elif publish.topic.endswith("/status"):
                self.gateway.received(None, publish, self.who, done)
                return
        elif publish.topic.startswith(KV) and self._is_echo(publish):
            pass
        else:
            self.gateway.received(None, publish, self.who, done)
            return
        if done is not None:
            done(True)

    def _check_replayed(self, publish: Publish) -> None:
        key = publish.topic[len(KV):]
        try:
            entry = self.gateway.scope.kv.get(key)
        except Exception:  # not a key the store could hold: clear it
            entry = None
        if entry is None and publish.payload:
            self._publish(Outgoing(publish.topic, b"", True, "kv"))

    def _is_echo(self, publish: Publish) -> bool:
        pending = self._echoes.get(publish.topic)
        if pending and pending[0] == publish.payload:
            pending.popleft()
            if not pending:
                del self._echoes[publish.topic]
            return True
        return False

    def _publish(self, message: Outgoing) -> None:
        if self._out is None:
            return
        if message.topic.startswith(KV):
            pending = self._echoes.setdefault(message.topic, deque())
            if len(pending) >= MAX_ECHOES:
                pending.clear()
            pending.append(message.payload)
        qos = min(message.qos, 1)  # to an external broker at most QoS 1: this client answers PUBACKs only
        packet_id = self._next_id() if qos else None
        self._out.send_nowait(codec.encode_publish(message.topic, message.payload, qos, message.retain, packet_id))

    def _settle(self, entry: list, ok: bool) -> None:
        if self._out is None:
            return
        if not ok:  # not durable: drop the link so the broker redelivers
            log.warning("a write from the broker failed; reconnecting so that it is delivered again")
            self._session_scope.cancel()
            return
        due = self._acks.ready(entry)
        if due:
            self._out.send_nowait(due)

    def _next_id(self) -> int:
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id


def _why(error: BaseException) -> str:
    """An error in words; trio wraps a failed TLS handshake (a certificate it did not trust) in BrokenResourceError."""
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) and error.__cause__ else error
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: {cause.verify_message}; give --mqtt-broker-ca the CA that signed the broker's certificate"
    if isinstance(error, trio.TooSlowError):
        return f"no TLS handshake within {CONNECT_TIMEOUT:g}s"
    return str(cause) or type(cause).__name__


async def _next_frame(stream: trio.abc.Stream, splitter: FrameSplitter) -> codec.Frame:
    while True:
        frame = splitter.next_frame()
        if frame is not None:
            return frame
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("the broker closed the connection")
        splitter.feed(data)


async def run_external(
    gateways: GatewayContext, url: str, *, ca: str = "", task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Attach to the broker at ``url`` until cancelled; starts at once and keeps retrying.

    ``ca``: for ``mqtts://``, the CA file the broker's certificate must chain to.
    """
    gateway = MqttGateway(gateways)
    link = BrokerLink(gateway, url, client_id=f"konsul-edge-{gateways.site}", ca=ca)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run, link)
            gateway.install_push()
            nursery.start_soon(link.run)
            # Local-first: the agent serves everything else while the broker is away.
            task_status.started(f"{link.scheme}://{link.host}:{link.port}")  # never the password
    finally:
        gateway.remove_push()

"""The embedded amqtt broker, with the agent in front of it and inside it (asyncio side).

Nothing in this module knows trio: it talks to the agent through the port
``boundary.AgentPort`` hands it, whose coroutine crosses into trio and whose
plain methods only touch memory.

How the agent hooks in:

- amqtt gets its connections from us (an "external" listener): we accept the
  socket on each of our listeners, plain or TLS (our own accept loop: a connection over the per-source or total cap
  is closed before anything is read, and an accept that fails for want of
  file descriptors backs off instead of reaching the loop's exception
  handler, which trio-asyncio turns into the end of the process), on a TLS
  listener finish the TLS handshake under a deadline (a failed one ends that
  connection only, counted), check every frame and admit the device first (``connection.py``), then hand the
  checked stream to ``Broker.external_connected``;
- presence follows amqtt's connect and disconnect events (a broker plugin);
- :class:`KonsulBroker` replaces three of amqtt 0.12's internals with the
  agent's rules. Its plugin hooks cannot express them: the auth hook runs
  after amqtt has already dropped or taken over the client's stored session,
  the topic hook costs a task per check, and amqtt's replay of retained
  messages on reconnect ignores topic checks altogether (it sends a session
  the retained messages of every filter *any* session holds). The overridden
  methods are checked at start-up, so an amqtt upgrade that renames them stops
  the agent with a clear error instead of silently dropping the checks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker, BrokerContext, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.plugins.base import BasePlugin
from amqtt.session import OutgoingApplicationMessage, Session

from konsul.protocols.admission import ConnectionLimit, source_of
from konsul.protocols.tls import HANDSHAKE_TIMEOUT_S
from konsul.sync.devices import hash_token
from konsul.sync.log_limits import peer_log

from . import codec
from .codec import ACCEPTED
from .connection import DeviceConnection
from .topics import KV

log = logging.getLogger("konsul.mqtt")

_OVERRIDDEN = (
    "_authenticate",
    "_topic_filtering",
    "_publish_retained_messages_for_subscription",
    "add_subscription",
    "_del_subscription",
    "_del_all_subscriptions",
    "_matches",
)
MAX_INFLIGHT = 20_000  # QoS 1 messages a device has not acknowledged before it is cut off
SESSION_EXPIRY = 7 * 24 * 3600  # a persistent session left alone this long is forgotten
TAKEOVER_WAIT = 5.0
MAX_SUBSCRIPTIONS = 1000  # topic filters one session may hold
MAX_QUEUED = 1000  # QoS 1 messages kept for a device away with a persistent session (mosquitto's default)
# Accept failing for want of descriptors or memory: wait, doubling, then try again.
ACCEPT_RETRY_MIN, ACCEPT_RETRY_MAX = 0.05, 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FD_SHARE = 0.75  # of the open-files limit, MQTT connections may hold at most this share


class KonsulBroker(Broker):
    """amqtt's broker with the agent's access rules and delivery (see the module docstring)."""

    agent: Any
    connections: dict[str, DeviceConnection]

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        # The device was admitted before amqtt saw its connection; this is amqtt asking again.
        return session.client_id in self.agent.records

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if action == Action.SUBSCRIBE:
            return self.agent.may_subscribe(session.client_id, topic)
        if action == Action.RECEIVE:
            return self.agent.may_receive(session.client_id, topic)
        return False  # a device's PUBLISH is the agent's and never gets here

    # -- delivery of the agent's messages ------------------------------------------------
    #
    # amqtt's broadcast costs a few tasks and timers per message and subscriber,
    # each a round trip through trio-asyncio, and matches every message against
    # every filter. The agent's messages (KV changes, desired, status) instead
    # go out in batches: subscribers are found through an index of the filters,
    # and each connection gets one write per batch. QoS 1 messages are entered
    # in amqtt's in-flight table, so amqtt resends them if the device reconnects
    # before acknowledging; the acknowledgements themselves end in connection.py.

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        self._index = None
        topic_filter = subscription[0]
        client_id = session.client_id
        levels = topic_filter.split("/")
        if any(("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+") for i, level in enumerate(levels)):
            # amqtt answers 0x80 too, but without a word: counted and logged like every refusal.
            self.agent.refusals.refuse("topic", client_id, f"SUBSCRIBE {topic_filter!r}: a wildcard must be a whole level, '#' the last")
            return 0x80
        held = self._filters.setdefault(client_id, set())
        if topic_filter not in held and len(held) >= MAX_SUBSCRIPTIONS:
            self.agent.refusals.refuse("limit", client_id, f"SUBSCRIBE {topic_filter!r}: {MAX_SUBSCRIPTIONS} subscriptions held already")
            return 0x80
        code = await super().add_subscription(subscription, session)
        if code != 0x80:
            held.add(topic_filter)
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        self._index = None
        self._filters.get(session.client_id, set()).discard(a_filter)
        return super()._del_subscription(a_filter, session)

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._index = None
        self._filters.pop(session.client_id, None)
        await super()._del_all_subscriptions(session)

    def deliver(self, messages: list[Any]) -> None:
        """Send the agent's messages to every session subscribed to them."""
        index = self._subscription_index()
        batches: dict[str, tuple[Session, list[tuple[str, bytes, int, bool]]]] = {}
        for message in messages:
            levels = message.topic.split("/")
            seen: set[str] = set()
            for k in range(len(levels) + 1):
                for topic_filter in index.get(tuple(levels[:k]), ()):
                    if not self._matches(message.topic, topic_filter):
                        continue
                    for session, granted in self._subscriptions.get(topic_filter, ()):
                        client_id = session.client_id
                        if client_id in seen or not self.agent.may_receive(client_id, message.topic):
                            continue
                        seen.add(client_id)  # overlapping filters: one copy
                        batch = batches.setdefault(client_id, (session, []))[1]
                        batch.append((message.topic, message.payload, min(granted, message.qos), False))
        for session, batch in batches.values():
            self._write_to(session, batch)

    def _subscription_index(self) -> dict[tuple[str, ...], list[str]]:
        """Filters keyed by their levels before the first wildcard (all of them if none)."""
        if self._index is None:
            index: dict[tuple[str, ...], list[str]] = {}
            for topic_filter, subscribers in self._subscriptions.items():
                if subscribers:
                    levels = topic_filter.split("/")
                    cut = next((i for i, level in enumerate(levels) if level in ("+", "#")), len(levels))
                    index.setdefault(tuple(levels[:cut]), []).append(topic_filter)
            self._index = index
        return self._index

    def _write_to(self, session: Session, items: list[tuple[str, bytes, int, bool]]) -> None:
        connection = self.connections.get(session.client_id)
        if session.transitions.state == "connected" and connection is not None:
            if len(session.inflight_out) > MAX_INFLIGHT:
                self.agent.refusals.refuse("overload", connection.who, f"over {MAX_INFLIGHT} QoS 1 messages unacknowledged")
                connection.close()
                return
            connection.inflight = session.inflight_out
            data = bytearray()
            for topic, payload, qos, retain in items:
                if qos:
                    packet_id = session.next_packet_id
                    session.inflight_out[packet_id] = OutgoingApplicationMessage(packet_id, topic, 1, payload, retain)
                    connection.ours.add(packet_id)
                    data += codec.encode_publish(topic, payload, 1, retain, packet_id)
                else:
                    data += codec.encode_publish(topic, payload, 0, retain)
            connection.send(bytes(data))
        elif not session.clean_session and session.transitions.state != "connected":
            # Away with a persistent session: QoS 1 messages wait for it [MQTT-3.1.2-5].
            queue = session.retained_messages
            for topic, payload, qos, _retain in items:
                if not qos:
                    continue
                if queue.qsize() >= MAX_QUEUED:
                    # Bounded like mosquitto's max_queued_messages: a session left
                    # away must not hold every later message in memory for a week.
                    self.agent.refusals.refuse("overload", session.client_id, f"away with {MAX_QUEUED} messages queued; dropping {topic!r}")
                    continue
                queue.put_nowait(RetainedApplicationMessage(None, topic, payload, qos))

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        topic_filter, qos = subscription
        client_id = session.client_id
        # amqtt calls this on a reconnect for every filter of every session; only this one's count.
        if not any(s.client_id == client_id for s, _ in self._subscriptions.get(topic_filter, ())):
            return
        # KV topics are served from the store, which is their only copy. Read and
        # written in one step, so that no live update can overtake an older value.
        items = [(topic, data, min(qos, 1), True) for topic, data in self.agent.retained_kv(client_id, topic_filter)]
        for topic, retained in list(self._retained_messages.items()):
            if not topic.startswith(KV) and self._matches(topic, topic_filter) and self.agent.may_receive(client_id, topic):
                items.append((topic, retained.data, min(qos, 1, qos if retained.qos is None else retained.qos), True))
        if items:
            self._write_to(session, items)


class PresencePlugin(BasePlugin[BrokerContext]):
    """amqtt's connect and disconnect events, told to the agent."""

    @dataclass
    class Config:
        agent: Any = None

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        self.config.agent.connected(client_id, f"{client_session.remote_address}:{client_session.remote_port}")

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        self.config.agent.disconnected(client_id)


@dataclass(frozen=True)
class Listener:
    """One listening address of the embedded broker; with ``tls`` (a ``protocols.tls.ServerTls``) MQTT over TLS."""

    host: str
    port: int
    tls: Any = None


@dataclass
class _Live:
    connection: DeviceConnection
    finished: asyncio.Event


class EmbeddedBroker:
    """amqtt plus our listener; every method runs on asyncio."""

    def __init__(self, agent: Any) -> None:
        for name in _OVERRIDDEN:
            if not callable(getattr(Broker, name, None)):
                raise RuntimeError(f"amqtt {_amqtt_version()} has no Broker.{name}; the MQTT gateway needs amqtt 0.12")
        self.agent = agent
        self.drained = asyncio.Event()  # cleared while the agent's queue is over its high-water mark
        self.drained.set()
        self._live: dict[str, _Live] = {}
        self.connections: dict[str, DeviceConnection] = {}  # the live one per device
        self._tasks: set[asyncio.Task[Any]] = set()
        self.broker: KonsulBroker | None = None
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[Any]] = []
        limits = agent.limits
        self.admission = ConnectionLimit(min(limits.mqtt_connections, _fd_budget()), limits.mqtt_connections_per_source)
        if self.admission.total < limits.mqtt_connections:
            log.warning(
                "at most %d MQTT connections (%d%% of the open-files limit, not --mqtt-connections %d); "
                "raise the limit (ulimit -n, LimitNOFILE=) for more",
                self.admission.total, int(FD_SHARE * 100), limits.mqtt_connections,
            )

    async def start(self, listeners: list[Listener]) -> list[str]:
        """Listen on every one of ``listeners``; the ``host:port`` each is bound to, in order."""
        config = {
            # amqtt only receives the streams we hand it; one external listener serves them all.
            "listeners": {"default": {"type": "external", "bind": f"{listeners[0].host}:{listeners[0].port}"}},
            "plugins": {f"{__name__}.PresencePlugin": {"agent": self.agent}},
            "session_expiry_interval": SESSION_EXPIRY,
        }
        self.broker = KonsulBroker(config)
        self.broker.agent = self.agent
        self.broker.connections = self.connections
        self.broker._index = None
        self.broker._filters = {}
        await self.broker.start()
        bound: list[str] = []
        for listener in listeners:
            sockets = await _listen(listener.host, listener.port)
            self._sockets += sockets
            for sock in sockets:
                self._acceptors.append(self._spawn(self._accept_loop(sock, listener.tls)))
            address = sockets[0].getsockname()
            bound.append(f"{address[0]}:{address[1]}")
        return bound

    async def stop(self) -> None:
        for task in self._acceptors:  # before their sockets close under them
            task.cancel()
        if self._acceptors:
            await asyncio.wait(self._acceptors, timeout=5)
        for sock in self._sockets:
            sock.close()
        for live in list(self._live.values()):
            live.connection.close()
        if self.broker is not None:
            await self.broker.shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    # -- from the agent (see boundary.py for which of these cross) ------------------------

    async def send(self, messages: list[Any]) -> None:
        """Retain (all but KV, whose retained copy is the store) and deliver."""
        for message in messages:
            if message.kind != "kv":
                await self.broker.retain_message(None, message.topic, message.payload, message.qos)
        self.broker.deliver(messages)

    def deliver(self, messages: list[Any]) -> None:
        self.broker.deliver(messages)

    def settle(self, results: list[tuple[Any, bool]]) -> None:
        for done, ok in results:
            done(ok)
        if not self.agent.congested():
            self.drained.set()

    def kick(self, device_id: str, keep_token_hash: str | None = None, why: str = "device deleted") -> None:
        """Close ``device_id``'s live connection, unless it was made with the token whose hash is ``keep_token_hash``."""
        live = self._live.get(device_id)
        if live is None:
            return
        connect = live.connection.connect
        password = connect.password if connect is not None else None
        if keep_token_hash and password and hash_token(password.decode(errors="replace")) == keep_token_hash:
            return  # already connected with the new token
        log.info("closing the connection of %s (%s)", device_id, why)
        live.connection.close()

    # -- connections -------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_loop(self, listener: socket.socket, tls: Any = None) -> None:
        """Accept connections until stopped; never ends on an error a peer or the system causes.

        ``tls``: the ``ServerTls`` whose current context serves each new connection.
        """
        loop = asyncio.get_running_loop()
        retry = ACCEPT_RETRY_MIN
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the peer left before we got to it
            except OSError as error:
                if listener.fileno() < 0:
                    return  # closed by stop()
                # Out of descriptors (or buffers): the connection waits in the
                # backlog while others end. Never fatal, and logged rate-limited.
                self.agent.refusals.count("accept")
                peer_log.log(
                    log, logging.WARNING, ("mqtt-accept", error.errno),
                    "MQTT accept failed (%s); retrying in %.2fs", error.strerror or error, retry,
                )
                if error.errno not in _OUT_OF_RESOURCES:
                    log.debug("unexpected accept error", exc_info=True)
                await asyncio.sleep(retry)
                retry = min(retry * 2, ACCEPT_RETRY_MAX)
                continue
            retry = ACCEPT_RETRY_MIN
            source = source_of(address)
            bound = self.admission.try_admit(source)
            if bound is not None:
                # Closed before anything is read or allocated for it.
                sock.close()
                self.agent.refusals.count("connections")
                held = self.admission.count if bound == "total" else self.admission.held_by(source)
                cap = self.admission.total if bound == "total" else self.admission.per_source
                peer_log.log(
                    log, logging.WARNING, ("mqtt-connections", source),
                    "refused an MQTT connection from %s: %d connections held %s (at most %d)",
                    source, held, "in total" if bound == "total" else "by this address", cap,
                )
                continue
            # The context is taken now, not when the listener started: a SIGHUP
            # reload (protocols/tls.py) serves every connection accepted after it.
            self._spawn(self._accept(sock, address, source, tls, None if tls is None else tls.context))

    async def _accept(
        self, sock: socket.socket, address: Any, source: str, tls: Any, context: ssl.SSLContext | None
    ) -> None:
        writer = None
        try:
            if context is None:
                reader, writer = await asyncio.open_connection(sock=sock)
            else:
                streams = await self._tls_streams(sock, address, source, tls, context)
                if streams is None:
                    return
                reader, writer = streams
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Contained to this connection: an exception escaping an asyncio
            # task would reach the loop's handler and end the agent.
            peer_log.log(log, logging.ERROR, ("mqtt-failed", source), "MQTT connection from %s failed", source, exc_info=True)
        finally:
            self.admission.release(source)
            if writer is not None:
                writer.close()
            else:
                sock.close()

    async def _tls_streams(
        self, sock: socket.socket, address: Any, source: str, tls: Any, context: ssl.SSLContext
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The accepted socket after a TLS handshake as the server; None (counted, logged) if it failed.

        The same streams ``asyncio.open_connection`` makes, over asyncio's TLS
        transport: everything after the handshake is as on the plain listener.
        A plaintext client, a client that does not trust our certificate, one
        without a certificate ``--tls-verify-client on`` requires, or one that
        stalls past ``HANDSHAKE_TIMEOUT_S`` ends here; the connection held its
        place in the caps all along, so half-open handshakes cannot pile up.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                # A client that never answers our close_notify must not hold the socket for asyncio's 30 s.
                ssl_shutdown_timeout=HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, EOFError, TimeoutError) as error:  # ssl.SSLError is an OSError
            reason, detail = handshake_failure(error)
            tls.count_handshake_failure("mqtt", reason)  # konsul_tls_handshake_failures_total, with HTTPS's
            self.agent.refusals.tls_failed(f"{address[0]}:{address[1]}", source, detail)
            return None
        _shrink_tls_read_buffer(transport)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        connection = DeviceConnection(reader, writer, self.agent, self.drained, f"{peername[0]}:{peername[1]}")
        connect = await connection.handshake()
        if connect is None:
            connection.close()
            return
        code = await self.agent.admit(connect, connection.peer)
        if code != ACCEPTED:
            connection.refuse_connect(code)
            return
        connection.admitted()
        device_id = connect.client_id
        # A device reconnecting while its old connection looks alive: end the old
        # one first, so that amqtt never runs its take-over, which mixes up the
        # states of a persistent session. The newest connection is the live one
        # at once, so that several arriving together form a chain (each ends and
        # waits for the one before) instead of all waiting for the same old one
        # and then entering amqtt together, which left them without a CONNACK.
        live = _Live(connection, asyncio.Event())
        old = self._live.get(device_id)
        self._live[device_id] = live
        try:
            if old is not None:
                old.connection.close()
                try:
                    await asyncio.wait_for(old.finished.wait(), TAKEOVER_WAIT)
                except TimeoutError:
                    log.warning("the old connection of %s did not end in %ss", device_id, TAKEOVER_WAIT)
            if connection.closed:
                return  # a newer connection of the device took over while this one waited
            self.connections[device_id] = connection
            await self.broker.external_connected(connection, StreamWriterAdapter(writer), "default")
        finally:
            live.finished.set()
            if self._live.get(device_id) is live:
                del self._live[device_id]
                self.connections.pop(device_id, None)
            if not writer.is_closing():
                writer.close()


async def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names (as ``asyncio.start_server`` binds)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one port for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# What a TLS connection reads from its socket at a time, once connected: one
# whole TLS record (16 KiB of data and its overhead), and a little more.
TLS_READ_BUFFER = 20 * 1024


def _shrink_tls_read_buffer(transport: asyncio.BaseTransport) -> None:
    """Give a connected TLS transport a read buffer of ``TLS_READ_BUFFER`` instead of asyncio's 256 KiB.

    asyncio's ``SSLProtocol`` (3.11 to 3.13) holds a 256 KiB buffer for its
    socket reads per connection, zero-filled, so resident: 256 of the 330 KiB a
    held TLS connection cost (bench/mqtt_connection_memory.py --tls). A device
    connection sends a few small frames at a time. Done between two of the
    protocol's callbacks (it reads into the buffer and takes the bytes out in
    one), so swapping it is safe; if a later Python names these differently,
    nothing changes but the memory.
    """
    ssl_protocol = getattr(transport, "_ssl_protocol", None)
    if ssl_protocol is None or not hasattr(ssl_protocol, "_ssl_buffer_view"):
        return
    if getattr(ssl_protocol, "max_size", 0) > TLS_READ_BUFFER:
        ssl_protocol.max_size = TLS_READ_BUFFER  # an instance attribute: asyncio's default stays as it is
        ssl_protocol._ssl_buffer = bytearray(TLS_READ_BUFFER)
        ssl_protocol._ssl_buffer_view = memoryview(ssl_protocol._ssl_buffer)


# OpenSSL's reasons, in words that say what the operator or the client can do.
_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS (a plaintext MQTT client on the TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below 1.2",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate, and --tls-verify-client on requires one",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate is not signed by --tls-ca (or has expired)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate (give it the CA that signed --tls-cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate (its name or dates?)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected our certificate (its name or CA?)",
    "NO_SHARED_CIPHER": "no cipher both sides support",
}


# The ``reason`` label of konsul_tls_handshake_failures_total, as HTTPS counts
# them (protocols/http/server.py).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD"})
_CLIENT_CERTIFICATE = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                                 "NO_CERTIFICATE_RETURNED"})


def handshake_failure(error: BaseException) -> tuple[str, str]:
    """Why a server-side TLS handshake failed: ``(reason label, a few words for the log)``."""
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, "reason", None) or type(error).__name__
        detail = _HANDSHAKE_REASONS.get(reason, f"{reason} ({error})")
        if reason in _NOT_TLS:
            return "not_tls", detail
        if reason in _CLIENT_CERTIFICATE:
            return "client_certificate", detail
        if reason.startswith(("SSLV3_ALERT", "TLSV1_ALERT", "TLSV13_ALERT")):
            return "client_alert", detail
        if isinstance(error, ssl.SSLEOFError):
            return "closed", "the client closed the connection during the handshake"
        return "protocol", detail
    if isinstance(error, (TimeoutError, ConnectionAbortedError)):
        return "timeout", f"not finished within {HANDSHAKE_TIMEOUT_S:g}s"
    if isinstance(error, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "closed", "the client closed the connection during the handshake"
    return "protocol", f"{type(error).__name__}: {error}"


def _fd_budget() -> int:
    """The MQTT connections the open-files limit leaves room for (the rest: HTTP, SQLite, CoAP)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, int(soft * FD_SHARE))


def _amqtt_version() -> str:
    import amqtt

    return getattr(amqtt, "__version__", "?")

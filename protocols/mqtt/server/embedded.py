"""The embedded broker on trio: one task per connection, the shared state in between.

This is the thin adapter around the sans-IO parts (``connection.py``,
``state.py``): a connection's task reads the client's bytes, feeds its
:class:`ServerConnection`, takes the events to the agent (``core.MqttGateway``)
or the broker state, then sends whatever accumulated in one write (the
acknowledgements of a whole read coalesce). Output that other tasks produce
for a connection (deliveries, acknowledgements of durable writes) is sent by
a writer task started when there is some and ending when it is sent, so an
idle connection holds one task, not two; at most one task sends on a
connection at a time (``_Link.writing``).

Back-pressure: while the agent's queue of writes is over its high-water mark
(``MqttGateway.congested``), every connection stops reading until it drains,
which pushes back on the senders through TCP instead of growing memory. A
client that stops reading while we have more than ``MAX_UNSENT`` bytes for it
is cut off rather than buffered for.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from konsul.sync.devices import hash_token

from .. import codec
from ..codec import ProtocolViolation, ReasonCode
from .connection import ConnectReceived, Disconnected, MessageReceived, ServerConnection, State, SubscribeReceived
from .connection import KEEPALIVE_GRACE, UnsubscribeReceived, max_packet_for
from .listener import Acceptor, Listener, listen
from .state import BrokerState, will_as_publish

log = logging.getLogger("konsul.mqtt")

READ_SIZE = 65536
CONNECT_TIMEOUT = 10.0
MAX_UNSENT = 16 * 1024 * 1024  # bytes waiting for a client that does not read
FLUSH_TIMEOUT = 2.0  # a closing connection's last words (CONNACK refusal, DISCONNECT) get this long
# Closing on a client that is still sending: its input is read and dropped this long (and up
# to this much) first, so that our last words are not lost to a reset (see _shut_and_drain).
DRAIN_TIMEOUT = 2.0
DRAIN_LIMIT = 4 * 1024 * 1024
TICK = 1.0  # seconds between looks at Will delays, session expiry and the session store


class _Link:
    """One live connection: its state machine, its stream, who is writing to it, how to end it."""

    __slots__ = ("connection", "stream", "peer", "reader_scope", "writing", "written", "send_will", "device_id",
                 "ended_by_us")

    def __init__(self, connection: ServerConnection, stream: trio.abc.Stream, peer: str) -> None:
        self.connection = connection
        self.stream = stream
        self.peer = peer
        self.reader_scope = trio.CancelScope()
        self.writing = False  # a task is sending this connection's output; it sends what is added meanwhile too
        self.written: trio.Event | None = None  # set when that task is done, for a connection closing
        self.send_will = True  # ended without a normal DISCONNECT
        self.device_id = ""
        self.ended_by_us = False  # we close it (a violation, a take-over, silence): close gracefully

    @property
    def who(self) -> str:
        return f"{self.device_id or '?'}@{self.peer}"


class EmbeddedBroker:
    """The broker the edge embeds; also the gateway's :class:`~konsul.protocols.mqtt.core.Outlet`."""

    def __init__(self, gateway: Any, store: Any = None) -> None:
        ctx = gateway.ctx
        self.gateway = gateway
        self.refusals = gateway.refusals
        self.max_payload = ctx.max_payload
        self.state = BrokerState(gateway, max_packet_for(self.max_payload), self._kick, store, trio.current_time())
        self.store = store
        self.links: dict[ServerConnection, _Link] = {}
        self.acceptor = Acceptor(gateway.refusals, ctx.limits, self._serve)
        self._drained = trio.Event()  # set while the agent keeps up
        self._drained.set()
        self._nursery: trio.Nursery | None = None  # where writer tasks run

    async def run(self, listeners: list[Listener], *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``listeners`` until cancelled; reports the ``host:port`` each is bound to."""
        bound: list[str] = []
        sockets: list[tuple[trio.SocketListener, Any]] = []
        try:
            for listener in listeners:
                opened = await listen(listener.host, listener.port)
                sockets += [(sock, listener.tls) for sock in opened]
                host, port = opened[0].socket.getsockname()[:2]
                bound.append(f"{host}:{port}")
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for sock, tls in sockets:
                    nursery.start_soon(self.acceptor.accept_loop, sock, tls, nursery)
                nursery.start_soon(self._tick)
                task_status.started(bound)
        finally:
            for sock, _tls in sockets:
                sock.socket.close()
            if self.store is not None:
                with trio.CancelScope(shield=True):
                    await self._save_sessions()

    # -- the gateway's outlet ---------------------------------------------------------------

    async def send(self, messages: list[Any]) -> None:
        self.state.publish(messages)
        self._flush()

    async def settle(self, results: list[tuple[Any, bool]]) -> None:
        for done, ok in results:
            done(ok)
        self._flush()
        if not self.gateway.congested():
            self._drained.set()

    async def kick(self, device_id: str, keep_token_hash: str | None = None, why: str = "device deleted") -> None:
        """Close ``device_id``'s live connection, unless it was made with the token whose hash is ``keep_token_hash``.

        Without ``keep_token_hash`` (the device was deleted) its session goes
        too, connected or away: a device registered again under the id starts clean.
        """
        connection = self.state.connection_of(device_id)
        if keep_token_hash is None:
            self.state.forget_session(device_id)
        if connection is None or connection.connect is None:
            return
        password = connection.connect.password
        if keep_token_hash and password and hash_token(password.decode(errors="replace")) == keep_token_hash:
            return  # already connected with the new token
        log.info("closing the connection of %s (%s)", device_id, why)
        connection.disconnect(ReasonCode.ADMINISTRATIVE_ACTION)
        self._kick(connection, send_will=False)

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, stream: trio.abc.Stream, peer: str) -> None:
        connection = ServerConnection(self.max_payload, trio.current_time())
        link = _Link(connection, stream, peer)
        connect = await self._handshake(link)
        if connect is None:
            return
        link.device_id = connect.client_id
        self.links[connection] = link
        due = self.state.open_session(connection, trio.current_time())
        if due is not None:  # the Will of the connection this one took over, before this one is online
            will, device_id = due
            self.gateway.received(device_id, will_as_publish(will), link.who, None)
        self.gateway.connected(connect.client_id, peer)
        session_expiry: int | None = None
        try:
            with link.reader_scope:
                session_expiry = await self._read(link)
            with trio.move_on_after(FLUSH_TIMEOUT):  # last words: a DISCONNECT, acknowledgements
                if link.writing:
                    link.written = trio.Event()
                    await link.written.wait()
                await self._last_words(link)
        finally:
            del self.links[connection]
            with trio.CancelScope(shield=True):
                due = self.state.close_connection(connection, trio.current_time(), send_will=link.send_will,
                                                  session_expiry=session_expiry)
                if due is not None:
                    will, device_id = due
                    self.gateway.received(device_id, will_as_publish(will), link.who, None)
                self.gateway.disconnected(connect.client_id)
                self._flush()
        if link.ended_by_us:
            await self._shut_and_drain(link)

    async def _handshake(self, link: _Link) -> codec.Connect | None:
        """The admitted CONNECT; None (refused, counted and answered) if there was none."""
        connection = link.connection
        event = None
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            while event is None:
                data = await link.stream.receive_some(READ_SIZE)
                if not data:
                    return None
                connection.receive_data(data, trio.current_time())
                try:
                    event = connection.next_event()
                except ProtocolViolation as violation:
                    self.refusals.refuse(violation.reason, link.who, str(violation), source=_host(link.peer))
                    await self._last_words(link)
                    await self._shut_and_drain(link)
                    return None
        if scope.cancelled_caught:
            self.refusals.refuse("timeout", link.who, f"no CONNECT within {CONNECT_TIMEOUT:g}s", source=_host(link.peer))
            return None
        assert isinstance(event, ConnectReceived)
        connect = event.connect
        if connect.protocol_level == codec.MQTT_5 and connect.properties.authentication_method is not None:
            self.refusals.refuse("auth", link.who, f"authentication method {connect.properties.authentication_method!r} "
                                 "is not supported; use the device token as the password", source=_host(link.peer))
            connection.refuse(ReasonCode.BAD_AUTHENTICATION_METHOD)
            await self._last_words(link)
            await self._shut_and_drain(link)
            return None
        code = await self.gateway.admit(connect, link.peer)
        if code != codec.ACCEPTED:
            connection.refuse(codec.V311_TO_V5_CONNACK[code])
            await self._last_words(link)
            await self._shut_and_drain(link)
            return None
        return connect

    async def _read(self, link: _Link) -> int | None:
        """Read and act until the client leaves; the session expiry a v5 DISCONNECT set, if any.

        Packets that came with the CONNECT (a SUBSCRIBE sent before the
        CONNACK arrived) are already buffered: they are handled first.
        """
        connection, stream, state = link.connection, link.stream, self.state
        while True:
            try:
                while (event := connection.next_event()) is not None:
                    if isinstance(event, MessageReceived):
                        self._received(link, event)
                    elif isinstance(event, SubscribeReceived):
                        state.subscribe(connection, event.subscribe)
                    elif isinstance(event, UnsubscribeReceived):
                        state.unsubscribe(connection, event.unsubscribe)
                    elif isinstance(event, Disconnected):
                        link.send_will = event.with_will
                        return event.session_expiry
            except ProtocolViolation as violation:
                self.refusals.refuse(violation.reason, link.who, str(violation))
                link.ended_by_us = True
                return None
            if not link.writing and connection.pending_output:
                # This read's answers, in one write, by this task: a client that does
                # not read them stops being read from (TCP pushes back both ways).
                link.writing = True
                try:
                    await self._send_all_pending(link)
                finally:
                    self._written(link)
            self._flush()
            if self._drained.is_set() and self.gateway.congested():
                self._drained = trio.Event()  # every connection pauses until the agent catches up
            if not self._drained.is_set():
                await self._drained.wait()
                connection.last_heard = trio.current_time()  # our pause is not the client's silence
            deadline = connection.keepalive_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline) as scope:
                data = await stream.receive_some(READ_SIZE)
            if scope.cancelled_caught:
                silent = KEEPALIVE_GRACE * connection.keepalive
                self.refusals.refuse("timeout", link.who, f"silent for {silent:g}s (1.5x keep-alive)")
                connection.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)
                link.ended_by_us = True
                return None
            if not data:
                return None
            connection.receive_data(data, trio.current_time())

    def _received(self, link: _Link, event: MessageReceived) -> None:
        publish, ack = event.publish, event.ack
        # A '$' topic is the broker's: refused, but acknowledged like any refused
        # message (docs/mqtt.md), so the client does not resend it.
        if publish.topic.startswith("$"):
            self.refusals.refuse("topic", link.who, f"PUBLISH to {publish.topic!r}: '$' topics belong to the broker; dropped")
            if ack is not None:
                link.connection.acknowledge(ack, ReasonCode.TOPIC_NAME_INVALID)
            return
        if ack is None:
            self.gateway.received(link.device_id, publish, link.who, None)
            return
        connection = link.connection

        def done(ok: bool, reason: int = 0) -> None:
            if not ok:
                # Not acknowledged: closing makes the client resend it after it reconnects.
                self._kick(connection)
                return
            connection.acknowledge(ack, reason)
            self._write_soon(link)

        self.gateway.received(link.device_id, publish, link.who, done)

    def _write_soon(self, link: _Link) -> None:
        """Have ``link``'s output sent: by the task sending for it now, else by a writer started for it."""
        if link.writing or not link.connection.pending_output or self._nursery is None:
            return
        link.writing = True
        self._nursery.start_soon(self._writer, link)

    async def _writer(self, link: _Link) -> None:
        try:
            await self._send_all_pending(link)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            link.reader_scope.cancel()  # the client is gone: its reader ends the connection
        except Exception:
            # Contained to this connection, as its reader's errors are (listener.py).
            log.exception("writing to %s failed", link.who)
            link.reader_scope.cancel()
        finally:
            self._written(link)

    @staticmethod
    async def _send_all_pending(link: _Link) -> None:
        connection, stream = link.connection, link.stream
        while data := connection.data_to_send():
            await stream.send_all(data)

    @staticmethod
    def _written(link: _Link) -> None:
        link.writing = False
        if link.written is not None:
            link.written.set()

    async def _last_words(self, link: _Link) -> None:
        data = link.connection.data_to_send()
        if data:
            with trio.move_on_after(FLUSH_TIMEOUT):
                try:
                    await link.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    @staticmethod
    async def _shut_and_drain(link: _Link) -> None:
        """End our side gracefully: shut down the write side, read and drop the client's input, then close.

        Closing a socket with unread input makes the kernel send a reset, and a
        client still sending (past its receive maximum, say) then gets a broken
        pipe before it has read the DISCONNECT that says why. Reading its input
        until it closes, for a bounded time and amount, lets it read that first.
        """
        stream = link.stream
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            with trio.move_on_after(DRAIN_TIMEOUT):
                drained = 0
                while drained < DRAIN_LIMIT:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass  # gone already: nothing to drain

    def _flush(self) -> None:
        links = self.links
        for connection in self.state.take_dirty():
            link = links.get(connection)
            if link is None or not connection.pending_output:
                continue
            if connection.pending_output > MAX_UNSENT:
                # A client that does not read is cut off, not buffered for.
                self.refusals.refuse("overload", link.who, f"not reading: over {MAX_UNSENT} bytes unsent")
                connection.data_to_send()
                self._kick(connection, send_will=True)
                continue
            self._write_soon(link)

    def _kick(self, connection: ServerConnection, send_will: bool = False) -> None:
        link = self.links.get(connection)
        if link is None:
            return
        link.send_will = send_will
        link.ended_by_us = True
        connection.state = State.CLOSED  # nothing more is queued for it; what is goes as its last words
        link.reader_scope.cancel()

    # -- time ---------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK)
            for will, device_id in self.state.tick(trio.current_time()):
                self.gateway.received(device_id, will_as_publish(will), device_id, None)
            if self.store is not None and self.store.pending:
                await self._save_sessions()

    async def _save_sessions(self) -> None:
        try:
            await self.store.flush()
        except Exception:
            log.exception("could not save MQTT session changes")


async def run_embedded(
    gateways: Any, listeners: list[Listener], *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway and the embedded broker on ``listeners`` until cancelled; reports each ``host:port``."""
    from pathlib import Path

    from ..core import MqttGateway
    from .persistence import SessionStore

    gateway = MqttGateway(gateways)
    replica = gateways.replica
    store = SessionStore(Path(replica.store.path).parent, replica.durability)
    broker = EmbeddedBroker(gateway, store)
    try:
        async with store.serving(), trio.open_nursery() as nursery:
            await nursery.start(gateway.run, broker)
            bound = await nursery.start(broker.run, listeners)
            gateway.install_push()
            task_status.started(bound)
    finally:
        gateway.remove_push()


def _host(peer: str) -> str:
    return peer.rpartition(":")[0] or peer

"""The embedded amqtt broker, with the agent in front of it and inside it (asyncio side).

Nothing in this module knows trio: it talks to the agent through the port
``boundary.AgentPort`` hands it, whose coroutine crosses into trio and whose
plain methods only touch memory.

How the agent hooks in:

- amqtt gets its connections from us (an "external" listener): we accept the
  socket, check every frame and admit the device first (``connection.py``),
  then hand the checked stream to ``Broker.external_connected``;
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
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker, BrokerContext, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.plugins.base import BasePlugin
from amqtt.session import OutgoingApplicationMessage, Session

from . import frames
from .connection import DeviceConnection
from .frames import ACCEPTED
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
        return await super().add_subscription(subscription, session)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        self._index = None
        return super()._del_subscription(a_filter, session)

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._index = None
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
                    data += frames.encode_publish(topic, payload, 1, retain, packet_id)
                else:
                    data += frames.encode_publish(topic, payload, 0, retain)
            connection.send(bytes(data))
        elif not session.clean_session and session.transitions.state != "connected":
            # Away with a persistent session: QoS 1 messages wait for it [MQTT-3.1.2-5].
            for topic, payload, qos, _retain in items:
                if qos:
                    session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, payload, qos))

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
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        config = {
            "listeners": {"default": {"type": "external", "bind": f"{host}:{port}"}},
            "plugins": {f"{__name__}.PresencePlugin": {"agent": self.agent}},
            "session_expiry_interval": SESSION_EXPIRY,
        }
        self.broker = KonsulBroker(config)
        self.broker.agent = self.agent
        self.broker.connections = self.connections
        self.broker._index = None
        await self.broker.start()
        self.server = await asyncio.start_server(self._accept, host, port, reuse_address=True, backlog=1024)
        bound = self.server.sockets[0].getsockname()
        return f"{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
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

    def kick(self, device_id: str) -> None:
        live = self._live.get(device_id)
        if live is not None:
            log.info("closing the connection of %s (device deleted)", device_id)
            live.connection.close()

    # -- connections -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except Exception:
            log.exception("connection failed")
            writer.close()
        finally:
            self._tasks.discard(task)

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
        # states of a persistent session.
        old = self._live.get(device_id)
        if old is not None:
            old.connection.close()
            try:
                await asyncio.wait_for(old.finished.wait(), TAKEOVER_WAIT)
            except TimeoutError:
                log.warning("the old connection of %s did not end in %ss", device_id, TAKEOVER_WAIT)
        live = _Live(connection, asyncio.Event())
        self._live[device_id] = live
        self.connections[device_id] = connection
        try:
            await self.broker.external_connected(connection, StreamWriterAdapter(writer), "default")
        finally:
            live.finished.set()
            if self._live.get(device_id) is live:
                del self._live[device_id]
                del self.connections[device_id]
            if not writer.is_closing():
                writer.close()


def _amqtt_version() -> str:
    import amqtt

    return getattr(amqtt, "__version__", "?")

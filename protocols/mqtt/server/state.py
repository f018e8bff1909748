"""The broker's shared state: sessions, subscriptions, retained messages, wills (sans-IO).

:class:`BrokerState` is what every connection of the broker shares. The
adapter (``listener.py``) calls it when a connection's CONNECT is admitted,
when it subscribes or ends, and when the agent has messages for devices; it
answers with what to send, through each :class:`ServerConnection`. Times are
passed in; nothing here awaits.

What the agent decides stays the agent's (``core.py``): who may connect,
subscribe and receive, and the KV values a new subscription gets as retained
messages (the store is their only copy). Devices' own PUBLISH packets are
the agent's too and never routed device to device (the topic contract has
no such topic); what the broker routes is the agent's messages, and a Will.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..codec import MQTT_5, FilterError, Properties, Publish, ReasonCode, Subscribe, Unsubscribe
from ..codec import Will, matches, parse_filter
from .connection import RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM, ServerConnection, State
from .sessions import MAX_SESSION_EXPIRY, OutMessage, Session
from .subscriptions import Subscribed, SubscriptionIndex

MAX_SUBSCRIPTIONS = 1000  # topic filters one session may hold
MAX_QUEUED = 1000  # QoS 1/2 messages kept for a session away (mosquitto's max_queued_messages)
MAX_INFLIGHT = 20_000  # messages a connected client has not acknowledged or not been sent yet, before it is cut off
KV_PREFIX = "konsul/v1/kv/"


class Agent(Protocol):
    """What the broker asks the agent (``core.MqttGateway`` is one)."""

    refusals: Any

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool: ...

    def may_receive(self, device_id: str, topic: str) -> bool: ...

    def receiver(self, device_id: str) -> Callable[[str], bool]: ...

    def retained_kv(self, device_id: str, topic_filter: str) -> list[tuple[str, bytes]]: ...


class BrokerState:
    """Every session and subscription of the broker (see the module docstring).

    Args:
        agent: the gateway's rules.
        max_packet: the largest packet a client may send (announced to v5 clients).
        kick: called with a connection the broker ended (a take-over): the
            adapter writes what it has queued and closes it.
        store: where persistent sessions are kept across restarts (persistence.py), or None.
        now: the time on the clock the broker passes in later (restored sessions' times are on it).
    """

    def __init__(self, agent: Agent, max_packet: int, kick: Callable[[ServerConnection], None], store: Any = None,
                 now: float = 0.0) -> None:
        self.agent = agent
        self.max_packet = max_packet
        self.kick = kick
        self.store = store
        self.sessions: dict[str, Session] = {}
        self.index = SubscriptionIndex()
        self.retained: dict[str, OutMessage] = {}  # non-KV topics: desired, status
        self.wills: dict[str, tuple[float, Will, str]] = {}  # client id -> (when, will, who)
        self.dirty: set[ServerConnection] = set()  # connections with output to write
        self.away: set[str] = set()  # client ids of persistent sessions without a connection
        if store is not None:
            for session in store.load(now):
                self._restore(session)

    # -- connecting -------------------------------------------------------------------------

    def open_session(self, connection: ServerConnection, now: float) -> tuple[Will, str] | None:
        """Attach an admitted connection to its session (new, resumed or taken over) and accept it.

        Returns the Will due now, if any: a connection taken over closes without
        a DISCONNECT, so its Will goes [MQTT-3.1.4-3] unless it has a delay (v5) and
        the session goes on, which the new connection cancels it for [MQTT-3.1.3-9].
        A clean start ends the session, so a Will waiting for its delay goes too.
        """
        connect = connection.connect
        assert connect is not None
        client_id = connect.client_id
        if connect.protocol_level == MQTT_5:
            asked = connect.properties.session_expiry_interval or 0  # absent: the session ends with the connection
        else:
            asked = 0 if connect.clean_start else MAX_SESSION_EXPIRY
        expiry = min(asked, MAX_SESSION_EXPIRY)
        due: tuple[Will, str] | None = None
        waiting = self.wills.pop(client_id, None)  # a delayed Will is off once the client is back [MQTT-3.1.3-9]
        if waiting is not None and connect.clean_start:
            due = (waiting[1], waiting[2])  # ... unless the session ends first: then it goes now
        old = self.sessions.get(client_id)
        if old is not None and old.connection is not None:
            previous = old.connection
            assert isinstance(previous, ServerConnection)
            old.connection = None
            previous.session = None
            previous.disconnect(ReasonCode.SESSION_TAKEN_OVER)  # [MQTT-3.1.4-3]
            self.kick(previous)
            will = previous.connect.will if previous.connect is not None else None
            if will is not None:
                delayed = bool(will.properties.will_delay_interval) and old.persistent and not connect.clean_start
                if not delayed:
                    due = (will, previous.connect.client_id)
        if old is not None and (connect.clean_start or old.expired(now)):
            self._drop(old)
            old = None
        present = old is not None
        session = old or Session(client_id, expiry, connect.protocol_level)
        session.expiry = expiry
        session.version = connect.protocol_level
        self.sessions[client_id] = session
        self.away.discard(client_id)
        properties = None
        if connect.protocol_level == MQTT_5:
            properties = Properties(
                receive_maximum=RECEIVE_MAXIMUM,
                topic_alias_maximum=TOPIC_ALIAS_MAXIMUM,
                maximum_packet_size=self.max_packet,
                session_expiry_interval=expiry if expiry != asked else None,  # told only when we changed it
            )
        connection.accept(session, present, properties)
        if self.store is not None and session.persisted:
            self.store.forget(client_id)  # it is live again: memory holds the truth
            session.persisted = False
        self.dirty.add(connection)
        return due

    def close_connection(self, connection: ServerConnection, now: float, *, send_will: bool,
                         session_expiry: int | None = None) -> tuple[Will, str] | None:
        """The connection ended (``send_will``: not by a normal DISCONNECT). The Will due now, if any."""
        connection.state = State.CLOSED
        session = connection.session
        connection.session = None
        connect = connection.connect
        if session is None or connect is None or session.connection is not connection:
            return None  # never accepted, or taken over: the new connection has the session
        session.connection = None
        if self.sessions.get(session.client_id) is not session:
            return None  # forgotten while connected (its device was deleted)
        session.away_since = now
        if session_expiry is not None:
            session.expiry = min(session_expiry, MAX_SESSION_EXPIRY)
        if not session.persistent:
            self._drop(session)
        else:
            self.away.add(session.client_id)
            if self.store is not None:
                self.store.save(session)
                session.persisted = True
        will = connect.will
        if not send_will or will is None:
            return None
        delay = will.properties.will_delay_interval or 0
        if delay and session.persistent:
            # The Will waits for the delay or the end of the session, whichever is first [MQTT-3.1.3-9].
            self.wills[session.client_id] = (now + min(delay, session.expiry), will, connect.client_id)
            return None
        return will, connect.client_id

    def tick(self, now: float) -> list[tuple[Will, str]]:
        """Forget expired sessions; the Wills whose delay has passed."""
        due = []
        for client_id, (when, will, who) in list(self.wills.items()):
            if when <= now:
                del self.wills[client_id]
                due.append((will, who))
        sessions = self.sessions
        for client_id in [c for c in self.away if c not in sessions or sessions[c].expired(now)]:
            self.away.discard(client_id)
            if client_id in sessions:
                self._drop(sessions[client_id])
        return due

    def forget_session(self, client_id: str) -> None:
        """End ``client_id``'s session now (its device is gone): subscriptions, queue, a pending Will."""
        self.wills.pop(client_id, None)
        self.away.discard(client_id)
        session = self.sessions.get(client_id)
        if session is not None:
            self._drop(session)

    def _drop(self, session: Session) -> None:
        for raw in list(session.filters):
            self._unindex(raw, session.client_id)
        session.filters.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if self.store is not None and session.persisted:
            self.store.forget(session.client_id)

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(self, connection: ServerConnection, packet: Subscribe) -> None:
        session = connection.session
        assert session is not None
        client_id = session.client_id
        identifier = packet.properties.subscription_identifiers[0] if packet.properties.subscription_identifiers else None
        codes: list[int] = []
        retained: list[OutMessage] = []
        for subscription in packet.subscriptions:
            raw = subscription.topic_filter
            try:
                parsed = parse_filter(raw)
            except FilterError as error:
                self.agent.refusals.refuse("topic", client_id, f"SUBSCRIBE {raw!r}: {error}")
                codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            if raw not in session.filters and len(session.filters) >= MAX_SUBSCRIPTIONS:
                self.agent.refusals.refuse("limit", client_id, f"SUBSCRIBE {raw!r}: {MAX_SUBSCRIPTIONS} subscriptions held already")
                codes.append(ReasonCode.QUOTA_EXCEEDED)
                continue
            if not self.agent.may_subscribe(client_id, parsed.filter):
                codes.append(ReasonCode.NOT_AUTHORIZED)
                continue
            options = (subscription.no_local << 2) | (subscription.retain_as_published << 3)
            new = raw not in session.filters
            session.filters[raw] = (subscription.qos, options, identifier)
            self.index.add(parsed.filter, parsed.share, Subscribed(
                client_id, subscription.qos, subscription.no_local, subscription.retain_as_published, identifier))
            codes.append(subscription.qos)
            handling = subscription.retain_handling
            if parsed.share is None and (handling == 0 or (handling == 1 and new)):  # none for shared ones [MQTT-3.8.4-4]
                retained += self._retained_for(client_id, parsed.filter, subscription.qos, identifier)
        connection.send_suback(packet.packet_id, codes)
        for message in retained:
            self._to_session(session, message)
        self.dirty.add(connection)
        if self.store is not None and session.persisted:
            self.store.save(session)

    def unsubscribe(self, connection: ServerConnection, packet: Unsubscribe) -> None:
        session = connection.session
        assert session is not None
        codes = []
        for raw in packet.topic_filters:
            if session.filters.pop(raw, None) is not None:
                self._unindex(raw, session.client_id)
                codes.append(ReasonCode.SUCCESS)
            else:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        connection.send_unsuback(packet.packet_id, codes)
        self.dirty.add(connection)

    def _unindex(self, raw: str, client_id: str) -> None:
        try:
            parsed = parse_filter(raw)
        except FilterError:
            return
        self.index.remove(parsed.filter, parsed.share, client_id)

    def _retained_for(self, client_id: str, topic_filter: str, qos: int, identifier: int | None) -> list[OutMessage]:
        # KV topics are served from the store, their only copy: read at the
        # moment of subscribing, so no live update can be overtaken by an older value.
        properties = Properties(subscription_identifiers=(identifier,)) if identifier else None
        found = [OutMessage(topic, payload, qos, True, properties)  # the agent publishes at QoS 2
                 for topic, payload in self.agent.retained_kv(client_id, topic_filter)]
        may_receive = self.agent.may_receive
        for topic, message in self.retained.items():
            if matches(topic_filter, topic) and may_receive(client_id, topic):
                found.append(OutMessage(topic, message.payload, min(qos, message.qos), True, properties))
        return found

    # -- delivering -----------------------------------------------------------------------------

    def publish(self, messages: Iterable[Any]) -> None:
        """Route the agent's messages (``core.Outgoing``: topic, payload, retain, qos) to every subscriber."""
        match = self.index.match
        receiver = self.agent.receiver
        receivers: dict[str, Callable[[str], bool]] = {}  # per subscriber, for this batch: rights looked up once

        def may_receive(client_id: str, topic: str) -> bool:
            allowed = receivers.get(client_id)
            if allowed is None:
                allowed = receivers[client_id] = receiver(client_id)
            return allowed(topic)

        sessions = self.sessions
        to_session = self._to_session

        def connected(client_id: str) -> bool:  # a shared group's message goes to a connected member if one is
            session = sessions.get(client_id)
            return session is not None and session.connection is not None

        for message in messages:
            topic = message.topic
            if message.retain and not topic.startswith(KV_PREFIX):
                if message.payload:
                    self.retained[topic] = OutMessage(topic, message.payload, message.qos, True)
                else:
                    self.retained.pop(topic, None)  # an empty retained message clears it [MQTT-3.3.1-10]
            entries = match(topic, connected)
            if not entries:
                continue
            if len(entries) == 1:  # the common case: one subscriber, one filter
                entry = entries[0]
                session = sessions.get(entry.client_id)
                if session is not None and may_receive(entry.client_id, topic):
                    ids = None if entry.identifier is None else Properties(subscription_identifiers=(entry.identifier,))
                    to_session(session, OutMessage(topic, message.payload, min(entry.qos, message.qos),
                                                   message.retain and entry.retain_as_published, ids))
                continue
            chosen: dict[str, Subscribed] = {}
            identifiers: dict[str, list[int]] = {}
            for entry in entries:
                client_id = entry.client_id
                held = chosen.get(client_id)
                if held is None:
                    if not may_receive(client_id, topic):
                        continue
                    chosen[client_id] = entry
                elif entry.qos > held.qos:  # overlapping filters: one copy, at the highest QoS [MQTT-3.3.4-2]
                    chosen[client_id] = entry
                if entry.identifier is not None:
                    identifiers.setdefault(client_id, []).append(entry.identifier)
            for client_id, entry in chosen.items():
                session = sessions.get(client_id)
                if session is None:
                    continue
                ids = identifiers.get(client_id)
                properties = Properties(subscription_identifiers=tuple(ids)) if ids else None
                retain = message.retain and entry.retain_as_published
                to_session(session, OutMessage(topic, message.payload, min(entry.qos, message.qos), retain, properties))

    def _to_session(self, session: Session, message: OutMessage) -> None:
        connection = session.connection
        if connection is not None:
            assert isinstance(connection, ServerConnection)
            if connection.state is not State.CONNECTED:
                return
            if len(session.inflight) + len(session.queue) >= MAX_INFLIGHT:
                self.agent.refusals.refuse("overload", session.client_id, f"over {MAX_INFLIGHT} messages unacknowledged")
                connection.disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
                self.kick(connection)
                return
            connection.deliver(message)
            self.dirty.add(connection)
        elif session.persistent and message.qos:
            # Away with a persistent session: QoS 1/2 messages wait for it [MQTT-3.1.2-5],
            # bounded like mosquitto's max_queued_messages.
            if len(session.queue) >= MAX_QUEUED:
                self.agent.refusals.refuse("overload", session.client_id,
                                           f"away with {MAX_QUEUED} messages queued; dropping {message.topic!r}")
                return
            session.queue.append(message)
            if self.store is not None:
                self.store.append(session.client_id, message)

    def connection_of(self, client_id: str) -> ServerConnection | None:
        session = self.sessions.get(client_id)
        connection = None if session is None else session.connection
        return connection if isinstance(connection, ServerConnection) else None

    def take_dirty(self) -> set[ServerConnection]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def _restore(self, session: Session) -> None:
        self.sessions[session.client_id] = session
        self.away.add(session.client_id)
        for raw, (qos, options, identifier) in session.filters.items():
            try:
                parsed = parse_filter(raw)
            except FilterError:
                continue
            self.index.add(parsed.filter, parsed.share, Subscribed(
                session.client_id, qos, bool(options & 0x04), bool(options & 0x08), identifier))


def will_as_publish(will: Will) -> Publish:
    """A Will as the PUBLISH the agent is handed when it is due."""
    return Publish(will.topic, will.payload, will.qos, will.retain)


__all__ = ["Agent", "BrokerState", "MAX_INFLIGHT", "MAX_QUEUED", "MAX_SUBSCRIPTIONS", "will_as_publish"]

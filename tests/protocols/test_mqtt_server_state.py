"""The broker's shared state (protocols/mqtt/server/state.py, subscriptions.py, persistence.py), without sockets."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.codec import Properties
from konsul.protocols.mqtt.server.connection import ServerConnection, State
from konsul.protocols.mqtt.server.persistence import SessionStore
from konsul.protocols.mqtt.server.state import MAX_QUEUED, BrokerState
from konsul.protocols.mqtt.server.subscriptions import Subscribed, SubscriptionIndex


class Refusals:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def refuse(self, reason: str, who: str, detail: str, **_kw) -> None:
        self.seen.append(reason)


class Agent:
    """Every device may use every topic but ``secret/...``; KV values from a dict."""

    def __init__(self) -> None:
        self.refusals = Refusals()
        self.kv: dict[str, bytes] = {}

    def may_subscribe(self, device_id: str, topic_filter: str) -> bool:
        return not topic_filter.startswith("secret")

    def may_receive(self, device_id: str, topic: str) -> bool:
        return not topic.startswith("secret")

    def receiver(self, device_id: str):
        return lambda topic: self.may_receive(device_id, topic)

    def retained_kv(self, device_id: str, topic_filter: str) -> list[tuple[str, bytes]]:
        return [(t, v) for t, v in self.kv.items() if codec.matches(topic_filter, t)]


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


def packets(connection: ServerConnection) -> list:
    splitter = codec.FrameSplitter(1 << 20)
    splitter.feed(connection.data_to_send())
    found = []
    while (frame := splitter.next_frame()) is not None:
        found.append(codec.decode(frame, connection.version))
    return found


class Broker:
    def __init__(self, store=None, now: float = 0.0) -> None:
        self.agent = Agent()
        self.kicked: list[ServerConnection] = []
        self.state = BrokerState(self.agent, 10_000, self.kicked.append, store, now)

    def connect(self, client_id: str, version: int = 4, now: float = 0.0, **connect) -> ServerConnection:
        connection = ServerConnection(max_payload=1000)
        connection.receive_data(codec.encode_connect(client_id, version=version, **connect), now)
        connection.next_event()
        self.due = self.state.open_session(connection, now)  # a Will due now (a take-over's)
        return connection

    def subscribe(self, connection: ServerConnection, *subscriptions, properties=None) -> list[int]:
        self.state.subscribe(connection, codec.Subscribe(1, list(subscriptions), properties or Properties()))
        suback = packets(connection)
        return suback


def test_index_matches_wildcards_and_never_shows_dollar_topics_to_them():
    index = SubscriptionIndex()
    for client, topic_filter in (("a", "x/+/z"), ("b", "x/#"), ("c", "#"), ("d", "x/y/z"), ("e", "+/y/#"), ("f", "$SYS/#")):
        index.add(topic_filter, None, Subscribed(client, 1))
    assert sorted(s.client_id for s in index.match("x/y/z")) == ["a", "b", "c", "d", "e"]
    assert sorted(s.client_id for s in index.match("x")) == ["b", "c"]  # "x/#" matches its parent
    assert sorted(s.client_id for s in index.match("$SYS/load")) == ["f"]
    assert index.remove("x/+/z", None, "a") and not index.remove("x/+/z", None, "a")
    assert sorted(s.client_id for s in index.match("x/q/z")) == ["b", "c"]


def test_shared_subscriptions_take_turns():
    index = SubscriptionIndex()
    for client in ("a", "b", "c"):
        index.add("jobs/#", "workers", Subscribed(client, 1))
    index.add("jobs/#", None, Subscribed("watcher", 0))
    got = [sorted(s.client_id for s in index.match("jobs/1")) for _ in range(3)]
    assert all("watcher" in g and len(g) == 2 for g in got)
    assert {g[0] if g[1] == "watcher" else g[1] for g in got} == {"a", "b", "c"}


def test_a_shared_group_passes_over_members_away_while_one_is_connected():
    index = SubscriptionIndex()
    for client in ("away-1", "here", "away-2"):
        index.add("jobs/#", "workers", Subscribed(client, 1))
    connected = {"here"}.__contains__
    assert [index.match("jobs/1", connected)[0].client_id for _ in range(4)] == ["here"] * 4
    # Nobody connected: they take turns as before (persistent sessions away queue it).
    assert {index.match("jobs/1", lambda _c: False)[0].client_id for _ in range(3)} == {"away-1", "here", "away-2"}


def test_subscribe_gets_retained_messages_as_retain_handling_says():
    broker = Broker()
    broker.agent.kv["konsul/v1/kv/a"] = b"1"
    broker.state.publish([Message("konsul/v1/devices/d/desired", b"{}", retain=True)])
    device = broker.connect("d", 5)
    packets(device)
    got = broker.subscribe(device, codec.Subscription("konsul/v1/#", 1))
    assert got[0] == codec.Suback(1, [1])
    assert sorted((p.topic, p.payload, p.retain) for p in got[1:]) == [
        ("konsul/v1/devices/d/desired", b"{}", True), ("konsul/v1/kv/a", b"1", True)]
    assert len(broker.subscribe(device, codec.Subscription("konsul/v1/#", 1, retain_handling=1))) == 1  # not new: none
    assert len(broker.subscribe(device, codec.Subscription("konsul/v1/kv/#", 1, retain_handling=2))) == 1  # never
    assert broker.subscribe(device, codec.Subscription("secret/#", 1), codec.Subscription("a/#/b", 0))[0] == codec.Suback(
        1, [0x87, 0x8F])


def test_a_v311_client_reads_failures_as_0x80_and_one_copy_at_the_highest_qos():
    broker = Broker()
    device = broker.connect("d")
    packets(device)
    got = broker.subscribe(device, codec.Subscription("t/#", 0), codec.Subscription("t/+", 1), codec.Subscription("secret", 1))
    assert got == [codec.Suback(1, [0, 1, 0x80])]
    broker.state.publish([Message("t/x", b"v")])
    (delivered,) = packets(device)
    assert (delivered.topic, delivered.qos, delivered.retain) == ("t/x", 1, False)


def test_subscription_identifiers_come_back_with_each_match():
    broker = Broker()
    device = broker.connect("d", 5)
    packets(device)
    broker.subscribe(device, codec.Subscription("t/#", 1), properties=Properties(subscription_identifiers=(42,)))
    broker.state.publish([Message("t/x", b"v")])
    (delivered,) = packets(device)
    assert delivered.properties.subscription_identifiers == (42,)


def test_a_persistent_session_queues_while_away_bounded():
    broker = Broker()
    device = broker.connect("d", clean_session=False)
    packets(device)
    broker.subscribe(device, codec.Subscription("t/#", 1))
    assert broker.state.close_connection(device, 1.0, send_will=False) is None
    broker.state.publish([Message(f"t/{i}", b"v") for i in range(MAX_QUEUED + 5)] + [Message("t/q0", b"v", qos=0)])
    assert broker.agent.refusals.seen == ["overload"] * 5
    again = broker.connect("d", clean_session=False, now=2.0)
    got = packets(again)
    assert got[0] == codec.Connack(True, 0) and len(got) == 1 + MAX_QUEUED
    assert [p.topic for p in got[1:4]] == ["t/0", "t/1", "t/2"]


def test_clean_start_drops_the_old_session_and_a_takeover_ends_the_old_connection():
    broker = Broker()
    first = broker.connect("d", 5, clean_session=False, properties=Properties(session_expiry_interval=60))
    packets(first)
    broker.subscribe(first, codec.Subscription("t/#", 1))
    second = broker.connect("d", 5, clean_session=False, properties=Properties(session_expiry_interval=60))
    assert broker.kicked == [first] and first.state is State.CLOSED
    assert packets(first) == [codec.Disconnect(0x8E)]
    assert packets(second)[0].session_present
    assert broker.state.close_connection(first, 1.0, send_will=True) is None  # the old one no longer holds it
    third = broker.connect("d", 5)  # clean start
    assert not packets(third)[0].session_present
    broker.state.publish([Message("t/x", b"v")])
    assert packets(third) == []  # its subscriptions went with the old session


def test_session_expiry_is_capped_and_told_and_a_delayed_will_waits():
    broker = Broker()
    will = ("konsul/v1/devices/d/status", b"offline", 1, True)
    device = broker.connect("d", 5, properties=Properties(session_expiry_interval=0xFFFFFFFF), will=will,
                            will_properties=Properties(will_delay_interval=30))
    connack = packets(device)[0]
    assert connack.properties.session_expiry_interval == 7 * 24 * 3600
    assert connack.properties.receive_maximum and connack.properties.topic_alias_maximum
    assert broker.state.close_connection(device, 10.0, send_will=True) is None
    assert broker.state.tick(20.0) == []
    (due,) = broker.state.tick(40.0)
    assert due[0].payload == b"offline" and due[1] == "d"
    # Back within the delay: no Will.
    device = broker.connect("d", 5, now=50.0, properties=Properties(session_expiry_interval=60), will=will,
                            will_properties=Properties(will_delay_interval=30))
    broker.state.close_connection(device, 60.0, send_will=True)
    broker.connect("d", 5, now=70.0, properties=Properties(session_expiry_interval=60))
    assert broker.state.tick(100.0) == []


def test_a_connection_taken_over_has_its_will_sent_unless_delayed_with_the_session_going_on():
    broker = Broker()
    will = ("konsul/v1/devices/d/status", b"offline", 1, True)
    broker.connect("d", will=will)  # 3.1.1: a take-over closes it without a DISCONNECT
    broker.connect("d")
    assert broker.due is not None and (broker.due[0].topic, broker.due[0].payload, broker.due[1]) == (will[0], will[1], "d")
    persistent = Properties(session_expiry_interval=60)
    delayed = Properties(will_delay_interval=30)
    broker.connect("e", 5, clean_session=False, properties=persistent, will=will, will_properties=delayed)
    broker.connect("e", 5, clean_session=False, properties=persistent)
    assert broker.due is None  # back before the delay ran out, the session going on [MQTT-3.1.3-9]
    broker.connect("f", 5, clean_session=False, properties=persistent, will=will, will_properties=delayed)
    broker.connect("f", 5)  # a clean start ends the session: the Will goes now
    assert broker.due is not None and broker.due[1] == "f"


def test_a_will_without_delay_is_due_at_once_and_not_after_disconnect():
    broker = Broker()
    will = ("konsul/v1/devices/d/status", b"offline", 0, True)
    device = broker.connect("d", will=will)
    due = broker.state.close_connection(device, 1.0, send_will=True)
    assert due is not None and due[0].topic == will[0]
    device = broker.connect("d", will=will)
    assert broker.state.close_connection(device, 2.0, send_will=False) is None


def write(store: SessionStore) -> None:
    """What the broker does each tick and when it stops: write the noted changes (the writer then stops)."""
    async def flush() -> None:
        async with store.serving():
            await store.flush()

    trio.run(flush)


def test_away_sessions_and_their_queues_survive_a_restart(tmp_path):
    store = SessionStore(tmp_path)
    broker = Broker(store)
    device = broker.connect("d", clean_session=False)
    packets(device)
    broker.subscribe(device, codec.Subscription("t/#", 1))
    broker.state.close_connection(device, 1.0, send_will=False)
    broker.state.publish([Message("t/1", b"one"), Message("t/2", b"two")])
    write(store)
    # A new process: the session is back, away, with its subscription and queue.
    restarted = Broker(SessionStore(tmp_path))
    again = restarted.connect("d", clean_session=False, now=5.0)
    got = packets(again)
    assert got[0] == codec.Connack(True, 0)
    assert [(p.topic, p.payload) for p in got[1:]] == [("t/1", b"one"), ("t/2", b"two")]
    restarted.state.publish([Message("t/3", b"three")])
    assert [p.topic for p in packets(again)] == ["t/3"]
    # Back and connected: its rows are gone, so a second restart does not resend.
    write(restarted.state.store)
    assert SessionStore(tmp_path).load(100.0) == []


def test_a_restored_session_expires_on_the_clock_of_the_broker_that_restored_it(tmp_path):
    store = SessionStore(tmp_path)
    broker = Broker(store)
    device = broker.connect("d", 5, properties=Properties(session_expiry_interval=300))
    broker.state.close_connection(device, 1.0, send_will=False)
    write(store)
    # trio's clock starts anywhere: the restored session's times must be on it.
    restarted = Broker(SessionStore(tmp_path), now=1_000_000.0)
    assert restarted.state.tick(1_000_010.0) == [] and "d" in restarted.state.sessions
    restarted.state.tick(1_000_301.0)
    assert "d" not in restarted.state.sessions


def test_a_deleted_device_loses_its_session_connected_or_away(tmp_path):
    store = SessionStore(tmp_path)
    broker = Broker(store)
    away = broker.connect("gone", clean_session=False)
    packets(away)
    broker.subscribe(away, codec.Subscription("t/#", 1))
    broker.state.close_connection(away, 1.0, send_will=False)
    live = broker.connect("live", clean_session=False)
    packets(live)
    broker.subscribe(live, codec.Subscription("t/#", 1))
    broker.state.forget_session("gone")
    broker.state.forget_session("live")
    assert broker.state.close_connection(live, 2.0, send_will=True) is None
    broker.state.publish([Message("t/x", b"v")])
    assert broker.state.sessions == {} and broker.state.index.count == 0
    write(store)
    assert SessionStore(tmp_path).load(3.0) == []
    again = broker.connect("gone", clean_session=False)
    assert not packets(again)[0].session_present

"""The broker's per-connection state machine (protocols/mqtt/server/connection.py), bytes in, bytes out."""

from __future__ import annotations

import pytest

from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.codec import MQTT_5, Properties, ProtocolViolation
from konsul.protocols.mqtt.server.connection import (
    RECEIVE_MAXIMUM, ConnectReceived, Disconnected, LocalProtocolError, MessageReceived, ServerConnection, State,
    SubscribeReceived,
)
from konsul.protocols.mqtt.server.sessions import OutMessage, Session


def packets(data: bytes, version: int = 4) -> list:
    splitter = codec.FrameSplitter(1 << 20)
    splitter.feed(data)
    found = []
    while (frame := splitter.next_frame()) is not None:
        found.append(codec.decode(frame, version))
    return found


def connected(version: int = 4, **connect) -> ServerConnection:
    connection = ServerConnection(max_payload=1000)
    connection.receive_data(codec.encode_connect("dev-1", version=version, **connect), now=0.0)
    event = connection.next_event()
    assert isinstance(event, ConnectReceived) and event.connect.protocol_level == version
    connection.accept(Session("dev-1", 0, version), False, Properties(receive_maximum=RECEIVE_MAXIMUM) if version == 5 else None)
    assert packets(connection.data_to_send(), version)[0].reason_code == 0
    return connection


def test_bytes_after_the_connect_wait_until_it_is_admitted():
    connection = ServerConnection(max_payload=1000)
    connection.receive_data(codec.encode_connect("dev-1") + codec.encode_publish("a/b", b"x"), now=0.0)
    assert isinstance(connection.next_event(), ConnectReceived)
    assert connection.state is State.ADMITTING and connection.next_event() is None
    connection.accept(Session("dev-1", 0, 4), False)
    assert connection.data_to_send() == codec.encode_connack(False, 0)
    event = connection.next_event()
    assert isinstance(event, MessageReceived) and event.publish.payload == b"x" and event.ack is None


def test_a_refused_connect_ends_in_a_connack_the_client_reads():
    for version, expected in ((4, codec.encode_connack(False, 4)), (5, codec.encode_connack(False, 0x86, version=5))):
        connection = ServerConnection(max_payload=1000)
        connection.receive_data(codec.encode_connect("dev-1", version=version), now=0.0)
        connection.next_event()
        connection.refuse(codec.ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        assert connection.data_to_send() == expected and connection.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        connection.accept(Session("dev-1", 0, 5), False)


def test_acknowledgements_leave_in_arrival_order():
    connection = connected()
    connection.receive_data(b"".join(codec.encode_publish("t", b"%d" % i, 1, packet_id=i) for i in (1, 2, 3)), now=1.0)
    events = [connection.next_event() for _ in range(3)]
    assert all(isinstance(e, MessageReceived) for e in events) and connection.next_event() is None
    connection.acknowledge(events[2].ack)
    connection.acknowledge(events[1].ack)
    assert connection.data_to_send() == b""  # the first is not done yet
    connection.acknowledge(events[0].ack)
    assert connection.data_to_send() == b"".join(codec.encode_puback(i) for i in (1, 2, 3))


def test_a_v5_refusal_carries_its_reason_code():
    connection = connected(5)
    connection.receive_data(codec.encode_publish("t", b"x", 1, packet_id=7, version=5), now=1.0)
    connection.acknowledge(connection.next_event().ack, codec.ReasonCode.NOT_AUTHORIZED)
    assert packets(connection.data_to_send(), 5) == [codec.Ack(codec.PUBACK, 7, 0x87)]


def test_qos_2_exactly_once_and_pings():
    connection = connected()
    connection.receive_data(codec.encode_publish("t", b"x", 2, packet_id=5), now=1.0)
    event = connection.next_event()
    connection.acknowledge(event.ack)
    assert connection.data_to_send() == codec.encode_pubrec(5)
    # The same message again before PUBREL: acknowledged again, not handed on twice.
    connection.receive_data(codec.encode_publish("t", b"x", 2, packet_id=5, dup=True) + codec.PINGREQ_BYTES, now=2.0)
    assert connection.next_event() is None
    assert connection.data_to_send() == codec.encode_pubrec(5) + codec.PINGRESP_BYTES
    connection.receive_data(codec.encode_pubrel(5) + codec.encode_pubrel(6), now=3.0)
    assert connection.next_event() is None
    assert connection.data_to_send() == codec.encode_pubcomp(5) + codec.encode_pubcomp(6)  # unknown ids too [MQTT-4.3.3-1]


def test_topic_aliases_are_resolved_and_unknown_ones_end_the_connection():
    connection = connected(5)
    connection.receive_data(
        codec.encode_publish("konsul/v1/kv/a", b"1", version=5, properties=Properties(topic_alias=3))
        + codec.encode_publish("", b"2", version=5, properties=Properties(topic_alias=3)), now=1.0)
    assert [connection.next_event().publish.topic for _ in range(2)] == ["konsul/v1/kv/a"] * 2
    connection.receive_data(codec.encode_publish("", b"3", version=5, properties=Properties(topic_alias=4)), now=2.0)
    with pytest.raises(ProtocolViolation) as refused:
        connection.next_event()
    assert refused.value.code == 0x94 and connection.state is State.CLOSED
    assert packets(connection.data_to_send(), 5) == [codec.Disconnect(0x94)]


def test_a_second_connect_and_an_oversized_payload_are_violations():
    connection = connected()
    connection.receive_data(codec.encode_connect("dev-1"), now=1.0)
    with pytest.raises(ProtocolViolation, match="second CONNECT"):
        connection.next_event()
    connection = connected()
    connection.receive_data(codec.encode_publish("t", b"x" * 1001), now=1.0)
    with pytest.raises(ProtocolViolation) as refused:
        connection.next_event()
    assert refused.value.reason == "too_large"


def test_a_v5_client_over_the_receive_maximum_is_cut_off():
    connection = connected(5)
    connection.receive_data(b"".join(codec.encode_publish("t", b"x", 1, packet_id=i, version=5)
                                     for i in range(1, RECEIVE_MAXIMUM + 2)), now=1.0)
    for _ in range(RECEIVE_MAXIMUM):
        assert isinstance(connection.next_event(), MessageReceived)
    with pytest.raises(ProtocolViolation) as refused:
        connection.next_event()
    assert refused.value.code == 0x93


def test_deliveries_respect_the_clients_receive_window_and_resume_on_reconnect():
    connection = ServerConnection(max_payload=1000)
    connection.receive_data(codec.encode_connect("dev-1", version=5, properties=Properties(receive_maximum=2)), now=0.0)
    connection.next_event()
    session = Session("dev-1", 60, 5)
    connection.accept(session, False)
    connection.data_to_send()
    sent = [connection.deliver(OutMessage(f"k/{i}", b"v", 1)) for i in range(3)]
    assert sent == [True, True, False] and len(session.queue) == 1
    assert [p.packet_id for p in packets(connection.data_to_send(), 5)] == [1, 2]
    connection.receive_data(codec.encode_puback(1), now=1.0)
    connection.next_event()
    (third,) = packets(connection.data_to_send(), 5)
    assert third.topic == "k/2" and third.packet_id == 3
    # The client goes; the next connection of the session gets the unacknowledged ones again, with DUP.
    again = ServerConnection(max_payload=1000)
    again.receive_data(codec.encode_connect("dev-1", version=5, clean_session=False), now=2.0)
    again.next_event()
    again.accept(session, True)
    resent = packets(again.data_to_send(), 5)
    assert resent[0] == codec.Connack(True, 0)
    assert [(p.packet_id, p.dup) for p in resent[1:]] == [(2, True), (3, True)]


def test_keepalive_deadline_and_disconnect():
    connection = connected(keepalive=10)
    assert connection.keepalive_deadline() == 15.0
    connection.receive_data(codec.PINGREQ_BYTES, now=12.0)
    connection.next_event()
    assert connection.keepalive_deadline() == 27.0
    connection.receive_data(codec.encode_disconnect(), now=13.0)
    assert connection.next_event() == Disconnected(False, None)
    assert connection.state is State.CLOSED


def test_subscribe_is_handed_to_the_broker():
    connection = connected(5)
    connection.receive_data(codec.encode_subscribe(4, [codec.Subscription("a/#", 1, retain_handling=2)], version=5), now=1.0)
    event = connection.next_event()
    assert isinstance(event, SubscribeReceived) and event.subscribe.subscriptions[0].retain_handling == 2
    connection.send_suback(4, [1])
    assert packets(connection.data_to_send(), MQTT_5) == [codec.Suback(4, [1])]

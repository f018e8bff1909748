"""The device-side MQTT codec, checked against the agent's own decoder (an independent implementation)."""

from __future__ import annotations

from konsul.protocols.mqtt import frames
from konsul.simulator import mqtt_codec as codec


def agent_view(data: bytes) -> frames.Frame:
    splitter = frames.FrameSplitter(max_body=1 << 20)
    splitter.feed(data)
    return splitter.next_frame()


def test_connect_with_credentials_and_a_retained_will():
    data = codec.encode_connect(
        "dev-1", keepalive=60, username="dev-1", password="tok", will=("konsul/v1/devices/dev-1/status", b"offline", 1, True)
    )
    connect = frames.decode_connect(agent_view(data))
    assert connect.client_id == "dev-1" and connect.clean_session and connect.keepalive == 60
    assert connect.username == "dev-1" and connect.password == b"tok"
    assert connect.will_topic == "konsul/v1/devices/dev-1/status" and connect.will_payload == b"offline"
    assert connect.will_qos == 1 and connect.will_retain


def test_anonymous_connect_has_no_credentials():
    connect = frames.decode_connect(agent_view(codec.encode_connect("dev-2", keepalive=30)))
    assert connect.username is None and connect.password is None and connect.will_topic is None


def test_publish_and_subscribe_as_the_agent_reads_them():
    publish = frames.decode_publish(agent_view(codec.encode_publish("a/b", b"x" * 300, qos=1, packet_id=7)))
    assert (publish.topic, publish.payload, publish.qos, publish.packet_id) == ("a/b", b"x" * 300, 1, 7)
    assert frames.decode_subscribe(agent_view(codec.encode_subscribe(9, "a/+", 1)).body) == (9, [("a/+", 1)])


def test_reader_cuts_split_and_joined_packets():
    stream = (
        frames.encode_connack(False, 0)
        + frames.encode_publish("konsul/v1/devices/d/desired", b'{"interval":1}', qos=1, retain=True, packet_id=3)
        + frames.encode_puback(5)
    )
    reader = codec.PacketReader()
    packets = reader.feed(stream[:3]) + reader.feed(stream[3:20]) + reader.feed(stream[20:])
    assert [p.type for p in packets] == [codec.CONNACK, codec.PUBLISH, codec.PUBACK]
    assert codec.decode_connack(packets[0]) == 0
    desired = codec.decode_publish(packets[1])
    assert desired.retain and desired.packet_id == 3 and desired.payload == b'{"interval":1}'
    assert codec.decode_packet_id(packets[2]) == 5

"""MQTT framing: the agent's codec and the simulator's device codec.

Any bytes decode or raise the codec's own protocol error (the agent's
``ProtocolViolation``, the device's ``MqttError``), and every valid packet one
side encodes, both codecs decode to what was sent.
"""

from __future__ import annotations

from fuzz_strategies import budget, inputs
from fuzz_targets import TARGETS, mqtt_agent, mqtt_device
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.protocols.mqtt import frames
from konsul.simulator import mqtt_codec

AGENT_SEEDS = TARGETS["mqtt_agent"].seeds()
DEVICE_SEEDS = TARGETS["mqtt_device"].seeds()


@budget(400)
@given(inputs(AGENT_SEEDS))
@example(bytes.fromhex("10ffffffff7f"))  # a remaining length of five bytes
@example(bytes.fromhex("3602000000"))  # PUBLISH at QoS 3
def test_agent_takes_any_bytes(data):
    mqtt_agent(data)


@budget(400)
@given(inputs(DEVICE_SEEDS))
@example(bytes.fromhex("32020000"))
def test_device_takes_any_bytes(data):
    mqtt_device(data)


# -- round trips -----------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
_TOPICS = st.text(st.characters(codec="utf-8", exclude_characters="\x00+#"), min_size=1, max_size=40)
_PACKET_IDS = st.integers(1, 65535)


def _split(data: bytes) -> frames.Frame:
    splitter = frames.FrameSplitter(1 << 20)
    splitter.feed(data)
    frame = splitter.next_frame()
    assert frame is not None and splitter.next_frame() is None and frame.size == len(data)
    return frame


def _read(data: bytes) -> mqtt_codec.Packet:
    (packet,) = mqtt_codec.PacketReader().feed(data)
    return packet


@budget(150)
@given(topic=_TOPICS, payload=st.binary(max_size=300), qos=st.integers(0, 2), retain=st.booleans(), packet_id=_PACKET_IDS)
def test_publish_round_trips_between_both_codecs(topic, payload, qos, retain, packet_id):
    packet_id = packet_id if qos else None
    wanted = frames.Publish(topic, payload, qos, retain, False, packet_id)
    from_agent = frames.encode_publish(topic, payload, qos, retain, packet_id)
    assert frames.check_client_frame(_split(from_agent), first=False, max_payload=1 << 20) == wanted
    assert mqtt_codec.decode_publish(_read(from_agent)) == mqtt_codec.InboundPublish(topic, payload, qos, retain, packet_id)
    from_device = mqtt_codec.encode_publish(topic, payload, qos=qos, packet_id=packet_id, retain=retain)
    assert from_device == from_agent
    assert frames.decode_publish(_split(from_device)) == wanted


@budget(150)
@given(
    client_id=_TEXT,
    keepalive=st.integers(0, 65535),
    username=st.none() | _TEXT,
    password=st.none() | _TEXT,
    will=st.none() | st.tuples(_TOPICS, st.binary(max_size=40), st.integers(0, 2), st.booleans()),
)
def test_connect_round_trips(client_id, keepalive, username, password, will):
    if username is None:
        password = None  # a password needs a user name [MQTT-3.1.2-22]
    connect = frames.decode_connect(_split(frames.encode_connect(client_id, keepalive=keepalive, username=username, password=password)))
    assert (connect.client_id, connect.keepalive, connect.username) == (client_id, keepalive, username)
    assert connect.password == (None if password is None else password.encode())
    device = frames.decode_connect(
        _split(mqtt_codec.encode_connect(client_id, keepalive=keepalive, username=username, password=password, will=will))
    )
    assert (device.client_id, device.username, device.clean_session) == (client_id, username, True)
    if will is None:
        assert device.will_topic is None and device.will_payload is None
    else:
        assert (device.will_topic, device.will_payload, device.will_qos, device.will_retain) == will


@budget(100)
@given(packet_id=_PACKET_IDS, filters=st.lists(st.tuples(_TOPICS, st.integers(0, 2)), min_size=1, max_size=5))
def test_subscribe_round_trips(packet_id, filters):
    frame = _split(frames.encode_subscribe(packet_id, filters))
    assert frames.check_client_frame(frame, first=False, max_payload=0) is None
    assert frames.decode_subscribe(frame.body) == (packet_id, filters)
    topic, qos = filters[0]
    assert frames.decode_subscribe(_split(mqtt_codec.encode_subscribe(packet_id, topic, qos)).body) == (packet_id, [(topic, qos)])


@budget(50)
@given(packet_id=_PACKET_IDS, present=st.booleans(), code=st.integers(0, 5))
def test_acks_round_trip(packet_id, present, code):
    assert mqtt_codec.decode_packet_id(_read(frames.encode_puback(packet_id))) == packet_id
    assert frames.decode_packet_id(_split(mqtt_codec.encode_puback(packet_id))) == packet_id
    assert mqtt_codec.decode_connack(_read(frames.encode_connack(present, code))) == code
    assert frames.decode_connack(_split(frames.encode_connack(present, code))) == (present and code == 0, code)

"""MQTT framing: the one codec (``protocols/mqtt/codec``), as a broker and as a client reads it.

Any bytes decode or raise the codec's own protocol error (``ProtocolViolation``),
at either version, and every valid packet the codec encodes decodes to what
was sent. Round trips against an independent encoder are in
tests/protocols/test_mqtt_codec.py.
"""

from __future__ import annotations

from fuzz_strategies import budget, inputs
from fuzz_targets import TARGETS, mqtt_agent, mqtt_device
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.protocols.mqtt import codec

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
_VERSIONS = st.sampled_from([codec.MQTT_311, codec.MQTT_5])


def _split(data: bytes) -> codec.Frame:
    splitter = codec.FrameSplitter(1 << 20)
    splitter.feed(data)
    frame = splitter.next_frame()
    assert frame is not None and splitter.next_frame() is None and frame.size == len(data)
    return frame


@budget(150)
@given(topic=_TOPICS, payload=st.binary(max_size=300), qos=st.integers(0, 2), retain=st.booleans(), packet_id=_PACKET_IDS,
       version=_VERSIONS)
def test_publish_round_trips(topic, payload, qos, retain, packet_id, version):
    packet_id = packet_id if qos else None
    wire = codec.encode_publish(topic, payload, qos, retain, packet_id, version=version)
    assert codec.decode(_split(wire), version) == codec.Publish(topic, payload, qos, retain, False, packet_id)


@budget(150)
@given(
    client_id=_TEXT,
    keepalive=st.integers(0, 65535),
    username=st.none() | _TEXT,
    password=st.none() | _TEXT,
    will=st.none() | st.tuples(_TOPICS, st.binary(max_size=40), st.integers(0, 2), st.booleans()),
    version=_VERSIONS,
)
def test_connect_round_trips(client_id, keepalive, username, password, will, version):
    if username is None:
        password = None  # a password needs a user name in 3.1.1 [MQTT-3.1.2-22]
    wire = codec.encode_connect(client_id, keepalive=keepalive, username=username, password=password, will=will, version=version)
    connect = codec.decode_connect(_split(wire))
    assert (connect.protocol_level, connect.client_id, connect.keepalive, connect.username) == (version, client_id, keepalive, username)
    assert connect.password == (None if password is None else password.encode())
    if will is None:
        assert connect.will is None
    else:
        assert (connect.will_topic, connect.will_payload, connect.will_qos, connect.will_retain) == will


@budget(100)
@given(packet_id=_PACKET_IDS, filters=st.lists(st.tuples(_TOPICS, st.integers(0, 2)), min_size=1, max_size=5), version=_VERSIONS)
def test_subscribe_round_trips(packet_id, filters, version):
    packet = codec.decode(_split(codec.encode_subscribe(packet_id, filters, version=version)), version)
    assert packet == codec.Subscribe(packet_id, [codec.Subscription(f, q) for f, q in filters])


@budget(50)
@given(packet_id=_PACKET_IDS, present=st.booleans(), code=st.integers(0, 5), version=_VERSIONS)
def test_acks_round_trip(packet_id, present, code, version):
    for kind in (codec.PUBACK, codec.PUBREC, codec.PUBREL, codec.PUBCOMP):
        assert codec.decode(_split(codec.encode_ack(kind, packet_id, version=version)), version) == codec.Ack(kind, packet_id)
    connack = codec.decode(_split(codec.encode_connack(present, code, version=version)), version)
    assert connack == codec.Connack(present and code == 0, code)

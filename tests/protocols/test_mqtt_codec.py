"""The MQTT codec, packet by packet, checked against an independent encoder and decoder.

The reference is the Eclipse Paho interoperability suite's own packet classes
(``../shared/peers/paho.mqtt.testing/interoperability/mqtt/formats``), imported
from there, not copied: what one side encodes, the other decodes to the same
fields, for MQTT 5.0 and 3.1.1.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.codec import MQTT_5, MQTT_311, Properties, ProtocolViolation
from konsul.protocols.mqtt.codec.wire import pack_frame, pack_text

PAHO = Path(__file__).resolve().parents[3] / "shared" / "peers" / "paho.mqtt.testing" / "interoperability"
if not PAHO.is_dir():
    PAHO = Path("/work/shared/peers/paho.mqtt.testing/interoperability")


def _paho(name: str):
    sys.path.insert(0, str(PAHO))
    try:
        return importlib.import_module(f"mqtt.formats.{name}.{name}")
    finally:
        sys.path.remove(str(PAHO))


V5 = _paho("MQTTV5")
V311 = _paho("MQTTV311")


def split(data: bytes) -> codec.Frame:
    splitter = codec.FrameSplitter(1 << 20)
    splitter.feed(data)
    frame = splitter.next_frame()
    assert frame is not None and splitter.next_frame() is None and frame.size == len(data)
    return frame


def ours(data: bytes, version: int = MQTT_5):
    return codec.decode(split(data), version)


# -- properties, both ways -------------------------------------------------------------------

# The reference's attribute for each property: its name without spaces ("Maximum QoS" -> MaximumQoS).
_THEIR_NAMES = {ident: name.replace(" ", "") for name, ident in V5.Properties(1).names.items()}


def _camel(name: str) -> str:
    return _THEIR_NAMES[codec.properties.property_id(name)]


def to_paho(properties: Properties, packet_type: int):
    theirs = V5.Properties(99 if packet_type == 16 else packet_type)
    for _ident, (name, _kind, _where) in codec.PROPERTY_TABLE.items():
        value = getattr(properties, name)
        if value is None or value == ():
            continue
        setattr(theirs, _camel(name), list(value) if isinstance(value, tuple) else value)
    return theirs


def from_paho(theirs) -> dict:
    found = {}
    for _ident, (name, _kind, _where) in codec.PROPERTY_TABLE.items():
        if hasattr(theirs, _camel(name)):
            value = getattr(theirs, _camel(name))
            found[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
    return found


def as_dict(properties: Properties) -> dict:
    return {name: getattr(properties, name) for _i, (name, _k, _w) in codec.PROPERTY_TABLE.items()
            if getattr(properties, name) not in (None, ())}


# ASCII: the reference's writeUTF counts characters, not bytes, so it mis-encodes anything wider.
_TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=12)
_TOPIC = st.text(st.characters(min_codepoint=1, max_codepoint=127, exclude_characters="+#"), min_size=1, max_size=20)
_FILTER = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=20)
_U16 = st.integers(1, 65535)
_U32 = st.integers(0, 2**32 - 1)
_FLAG = st.integers(0, 1)
_KIND_VALUES = {0: _FLAG, 1: _U16, 2: _U32, 3: st.integers(1, 268_435_455), 4: st.binary(max_size=12), 5: _TEXT}


@st.composite
def properties_for(draw, packet_type: int) -> Properties:
    values: dict = {}
    for ident, (name, kind, where) in codec.PROPERTY_TABLE.items():
        if packet_type not in where or not draw(st.booleans()):
            continue
        if ident == 0x27:  # maximum packet size 0 is a protocol error
            values[name] = draw(st.integers(1, 2**32 - 1))
        elif kind == 6:
            values[name] = tuple(draw(st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3)))
        elif kind == 3:  # subscription identifiers: several in a PUBLISH, one in a SUBSCRIBE
            size = 3 if packet_type == codec.PUBLISH else 1
            values[name] = tuple(draw(st.lists(_KIND_VALUES[3], min_size=1, max_size=size)))
        else:
            values[name] = draw(_KIND_VALUES[kind])
    return Properties(**values)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([codec.CONNECT, codec.CONNACK, codec.PUBLISH, codec.PUBACK, codec.PUBREL, codec.SUBSCRIBE,
                        codec.SUBACK, codec.UNSUBSCRIBE, codec.DISCONNECT, codec.AUTH, 16]).flatmap(
    lambda t: st.tuples(st.just(t), properties_for(t))))
def test_properties_round_trip_with_paho(case):
    packet_type, properties = case
    packed = codec.pack_properties(properties)
    theirs = V5.Properties(99 if packet_type == 16 else packet_type)
    theirs.unpack(packed)
    assert from_paho(theirs) == as_dict(properties)
    assert codec.read_properties(codec.Cursor(to_paho(properties, packet_type).pack()), packet_type) == properties


@pytest.mark.parametrize(
    ("raw", "reason", "why"),
    [
        (bytes([10, 0x11, 0, 0, 0, 1, 0x11]) + b"\0\0\0\2", "protocol", "given twice"),  # session expiry twice
        (bytes([2, 0x7F, 0]), "malformed", "unknown property"),
        (bytes([3, 0x23, 0, 1]), "malformed", "not allowed"),  # a topic alias in a CONNECT
        (bytes([3, 0x21, 0, 0]), "protocol", "receive maximum 0"),
        (bytes([2, 0x17, 2]), "protocol", "not 0 or 1"),  # request problem information 2
        (bytes([9, 0x11, 0, 0]), "malformed", "past the end"),
    ],
)
def test_property_sets_the_spec_calls_broken_are_refused(raw, reason, why):
    with pytest.raises(ProtocolViolation, match=why) as refused:
        codec.read_properties(codec.Cursor(raw), codec.CONNECT)
    assert refused.value.reason == reason
    assert refused.value.code == (0x82 if reason == "protocol" else 0x81)


def test_user_properties_repeat_and_keep_their_order():
    props = Properties(user_properties=(("a", "1"), ("a", "2"), ("b", "")))
    assert codec.read_properties(codec.Cursor(codec.pack_properties(props)), codec.PUBLISH) == props


# -- packets, MQTT 5 ---------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(client_id=_TEXT, keepalive=st.integers(0, 65535), clean=st.booleans(), properties=properties_for(codec.CONNECT),
       will=st.none() | st.tuples(_TOPIC,
                                  st.binary(max_size=20), st.integers(0, 2), st.booleans(), properties_for(16)),
       credentials=st.none() | st.tuples(_TEXT, st.binary(max_size=12)))
def test_connect_v5_round_trips_with_paho(client_id, keepalive, clean, properties, will, credentials):
    theirs = V5.Connects()
    theirs.ClientIdentifier, theirs.KeepAliveTimer, theirs.CleanStart = client_id, keepalive, clean
    theirs.properties = to_paho(properties, codec.CONNECT)
    if will is not None:
        theirs.WillFlag, theirs.WillTopic, theirs.WillMessage, theirs.WillQoS, theirs.WillRETAIN = True, *will[:4]
        theirs.WillProperties = to_paho(will[4], 16)
    if credentials is not None:  # both flags: paho's pack swaps the user name and password bits
        theirs.usernameFlag = theirs.passwordFlag = True
        theirs.username, theirs.password = credentials
    connect = codec.decode_connect(split(theirs.pack()))
    assert (connect.protocol_level, connect.client_id, connect.keepalive, connect.clean_start) == (5, client_id, keepalive, clean)
    assert connect.properties == properties
    if will is None:
        assert connect.will is None
    else:
        assert (connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain) == will[:4]
        assert connect.will.properties == will[4]
    assert (connect.username, connect.password) == (credentials or (None, None))
    assert codec.encode(connect) == theirs.pack()


@settings(max_examples=150, deadline=None)
@given(topic=_TOPIC,
       payload=st.binary(max_size=300), qos=st.integers(0, 2), retain=st.booleans(), dup=st.booleans(), packet_id=_U16,
       properties=properties_for(codec.PUBLISH))
def test_publish_v5_round_trips_with_paho(topic, payload, qos, retain, dup, packet_id, properties):
    dup = dup and qos > 0
    mine = codec.encode_publish(topic, payload, qos, retain, packet_id if qos else None, dup, version=MQTT_5, properties=properties)
    theirs = V5.Publishes(DUP=dup, QoS=qos, RETAIN=retain, MsgId=packet_id, TopicName=topic, Payload=payload)
    theirs.properties = to_paho(properties, codec.PUBLISH)
    assert mine == theirs.pack()
    publish = ours(mine)
    assert publish == codec.Publish(topic, payload, qos, retain, dup, packet_id if qos else None, properties)


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from([codec.PUBACK, codec.PUBREC, codec.PUBREL, codec.PUBCOMP]), packet_id=_U16, data=st.data())
def test_acknowledgements_v5_round_trip_with_paho(kind, packet_id, data):
    code = data.draw(st.sampled_from([0, 0x92] if kind in (codec.PUBREL, codec.PUBCOMP) else [0, 0x10, 0x80, 0x87, 0x97]))
    properties = data.draw(properties_for(kind))
    theirs = {codec.PUBACK: V5.Pubacks, codec.PUBREC: V5.Pubrecs, codec.PUBREL: V5.Pubrels, codec.PUBCOMP: V5.Pubcomps}[kind](PacketId=packet_id)
    theirs.reasonCode.value = code
    theirs.properties = to_paho(properties, kind)
    mine = codec.encode_ack(kind, packet_id, code, version=MQTT_5, properties=properties)
    assert mine == theirs.pack()
    assert ours(mine) == codec.Ack(kind, packet_id, code, properties)


@settings(max_examples=100, deadline=None)
@given(packet_id=_U16, data=st.data(), subscriptions=st.lists(st.tuples(
    _FILTER,
    st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)), min_size=1, max_size=4))
def test_subscribe_v5_round_trips_with_paho(packet_id, data, subscriptions):
    subscriptions = [(f, q, nl and not f.startswith("$share/"), rap, rh) for f, q, nl, rap, rh in subscriptions]
    properties = data.draw(properties_for(codec.SUBSCRIBE))
    theirs = V5.Subscribes(MsgId=packet_id, Data=[(f, V5.SubscribeOptions(q, nl, rap, rh)) for f, q, nl, rap, rh in subscriptions])
    theirs.properties = to_paho(properties, codec.SUBSCRIBE)
    wanted = codec.Subscribe(packet_id, [codec.Subscription(*s) for s in subscriptions], properties)
    assert ours(theirs.pack()) == wanted
    assert codec.encode(wanted, MQTT_5) == theirs.pack()


@settings(max_examples=60, deadline=None)
@given(packet_id=_U16, codes=st.lists(st.sampled_from([0, 1, 2, 0x80, 0x87, 0x8F, 0x9E]), min_size=1, max_size=5),
       filters=st.lists(_FILTER, min_size=1, max_size=4))
def test_suback_unsubscribe_unsuback_v5_round_trip_with_paho(packet_id, codes, filters):
    suback = V5.Subacks(PacketId=packet_id, reasonCodes=[V5.ReasonCodes(codec.SUBACK, identifier=c) for c in codes])
    assert ours(suback.pack()) == codec.Suback(packet_id, codes)
    assert codec.encode_suback(packet_id, codes, version=MQTT_5) == suback.pack()
    unsubscribe = V5.Unsubscribes(PacketId=packet_id, TopicFilters=filters)
    assert ours(unsubscribe.pack()) == codec.Unsubscribe(packet_id, filters)
    assert codec.encode_unsubscribe(packet_id, filters, version=MQTT_5) == unsubscribe.pack()
    unsuback = V5.Unsubacks(PacketId=packet_id, reasonCodes=[V5.ReasonCodes(codec.UNSUBACK, identifier=c) for c in (0, 0x11)])
    assert ours(unsuback.pack()) == codec.Unsuback(packet_id, [0, 0x11])


@settings(max_examples=60, deadline=None)
@given(present=st.booleans(), properties=properties_for(codec.CONNACK), code=st.sampled_from([0, 0x80, 0x84, 0x86, 0x87]))
def test_connack_v5_round_trips_with_paho(present, properties, code):
    theirs = V5.Connacks()
    theirs.sessionPresent = present and code == 0
    theirs.reasonCode.value = code
    theirs.properties = to_paho(properties, codec.CONNACK)
    mine = codec.encode_connack(present, code, version=MQTT_5, properties=properties)
    assert mine == theirs.pack()
    assert ours(mine) == codec.Connack(present and code == 0, code, properties)


@pytest.mark.parametrize("code", [0, 0x04, 0x8E, 0x81])
def test_disconnect_auth_and_pings_v5(code):
    theirs = V5.Disconnects()
    theirs.reasonCode.value = code
    theirs.properties.ReasonString = "why"
    mine = codec.encode_disconnect(code, version=MQTT_5, properties=Properties(reason_string="why"))
    assert mine == theirs.pack() and ours(mine) == codec.Disconnect(code, Properties(reason_string="why"))
    assert ours(codec.encode_disconnect(version=MQTT_5)) == codec.Disconnect()
    assert ours(codec.encode_auth(0x18, properties=Properties(authentication_method="SCRAM"))) == codec.Auth(
        0x18, Properties(authentication_method="SCRAM"))
    assert ours(V5.Pingreqs().pack()) is codec.PING_REQUEST and ours(V5.Pingresps().pack()) is codec.PING_RESPONSE


# -- MQTT 3.1.1 -------------------------------------------------------------------------------------

def test_v311_packets_round_trip_with_paho():
    connect = V311.Connects()
    connect.ClientIdentifier, connect.KeepAliveTimer, connect.CleanSession = "dev-1", 30, False
    connect.WillFlag, connect.WillTopic, connect.WillMessage, connect.WillQoS = True, "d/status", b"offline", 1
    connect.usernameFlag, connect.username, connect.passwordFlag, connect.password = True, "dev-1", True, b"tok"
    mine = codec.decode_connect(split(connect.pack()))
    assert (mine.protocol_level, mine.client_id, mine.keepalive, mine.clean_session) == (4, "dev-1", 30, False)
    assert (mine.will_topic, mine.will_payload, mine.will_qos, mine.username, mine.password) == ("d/status", b"offline", 1, "dev-1", b"tok")
    assert codec.encode(mine) == connect.pack()

    publish = V311.Publishes(QoS=1, MsgId=7, TopicName="a/b", Payload=b"x" * 200)
    assert ours(publish.pack(), MQTT_311) == codec.Publish("a/b", b"x" * 200, 1, False, False, 7)
    assert codec.encode_publish("a/b", b"x" * 200, 1, False, 7) == publish.pack()

    subscribe = V311.Subscribes(MsgId=3, Data=[("a/+", 1), ("b/#", 2)])
    assert ours(subscribe.pack(), MQTT_311) == codec.Subscribe(3, [codec.Subscription("a/+", 1), codec.Subscription("b/#", 2)])
    assert codec.encode_subscribe(3, [("a/+", 1), ("b/#", 2)]) == subscribe.pack()
    assert codec.encode_suback(3, [1, 0x80]) == V311.Subacks(MsgId=3, Data=[1, 0x80]).pack()
    assert codec.encode_unsuback(3) == V311.Unsubacks(MsgId=3).pack()
    connack = V311.Connacks()
    connack.flags = 1
    assert codec.encode_connack(True, 0) == connack.pack()
    for kind, cls in ((codec.PUBACK, V311.Pubacks), (codec.PUBREC, V311.Pubrecs), (codec.PUBREL, V311.Pubrels), (codec.PUBCOMP, V311.Pubcomps)):
        assert codec.encode_ack(kind, 9) == cls(MsgId=9).pack()
        assert ours(cls(MsgId=9).pack(), MQTT_311) == codec.Ack(kind, 9)
    assert ours(V311.Disconnects().pack(), MQTT_311) == codec.Disconnect()


# -- refusals -------------------------------------------------------------------------------------

def _raw(header: int, body_hex: str) -> bytes:
    return pack_frame(header, bytes.fromhex(body_hex))


@pytest.mark.parametrize(
    ("data", "version", "reason", "why"),
    [
        (_raw(0x36, "00000000"), MQTT_311, "malformed", "QoS 3"),
        (_raw(0x38, "000161"), MQTT_311, "malformed", "DUP"),  # QoS 0 with DUP
        (_raw(0x30, "0003612f2b"), MQTT_311, "malformed", "wildcard"),  # topic a/+
        (_raw(0x62, "000100"), MQTT_311, "malformed", "trailing"),  # a 3.1.1 PUBREL with a reason code
        (_raw(0x60, "0001"), MQTT_311, "malformed", "reserved flags"),  # PUBREL must carry flags 2
        (_raw(0xF0, ""), MQTT_311, "malformed", "does not exist"),  # AUTH in 3.1.1
        (_raw(0x82, "0001000001" + "78" + "30"), MQTT_5, "malformed", "options"),  # retain handling 3
        (_raw(0x82, "000100000a2473686172652f612f62" + "04"), MQTT_5, "protocol", "no local"),  # $share/a/b
        (_raw(0x30, "000000"), MQTT_5, "protocol", "empty topic"),
        (_raw(0xE0, "01"), MQTT_311, "malformed", "body"),
        (_raw(0x40, "0001" + "00" + "03" + "230001"), MQTT_5, "malformed", "not allowed"),  # a topic alias in a PUBACK
    ],
)
def test_malformed_packets_raise_one_error_with_a_reason(data, version, reason, why):
    with pytest.raises(ProtocolViolation, match=why) as refused:
        codec.decode(split(data), version)
    assert refused.value.reason == reason


def test_a_frame_over_the_bound_is_refused_before_its_body_arrives():
    splitter = codec.FrameSplitter(max_body=100)
    splitter.feed(bytes([0x30, 0xE9, 0x07]))  # declares 1001 bytes; none of them sent
    with pytest.raises(ProtocolViolation) as refused:
        splitter.next_frame()
    assert refused.value.reason == "too_large" and refused.value.code == 0x95


def test_other_protocol_versions_are_told_in_their_own_form():
    for level, expected in ((3, bytes.fromhex("20020001")), (5, bytes.fromhex("2003008400")), (6, bytes.fromhex("2003008400"))):
        data = pack_frame(0x10, pack_text("MQTT") + bytes([level, 2, 0, 10]) + (b"\0" if level == 5 else b"") + pack_text(""))
        if level == 5:
            assert codec.decode_connect(split(data)).protocol_level == 5
            continue
        with pytest.raises(codec.UnsupportedProtocol) as refused:
            codec.decode_connect(split(data))
        assert codec.encode_refusal_for(refused.value.level) == expected


def test_shared_subscription_filters():
    assert codec.parse_filter("$share/g1/konsul/v1/kv/#") == codec.TopicFilter("konsul/v1/kv/#", "g1")
    assert codec.parse_filter("a/+/c") == codec.TopicFilter("a/+/c")
    for bad in ("$share/g1", "$share//a", "$share/g+/a", "a/b#", "a/#/b", "a+"):
        with pytest.raises(codec.FilterError):
            codec.parse_filter(bad)
    assert codec.matches("a/+/c", "a/b/c") and codec.matches("a/#", "a") and not codec.matches("#", "$SYS/x")
    assert not codec.matches("+/x", "$SYS/x") and codec.matches("$SYS/#", "$SYS/x")

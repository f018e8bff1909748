"""Seed corpora of the fuzz targets: valid inputs, as the agent and its peers really send them.

Mutating these reaches the code behind each parser's framing; the property
tests and ``bench/fuzz.py`` start from the same seeds.
"""

from __future__ import annotations

import cbor2
from pycrdt import Doc, Map

from konsul.protocols.mqtt import codec
from konsul.sync import session as sync_session
from konsul.sync import wire
from konsul.sync.catalog import ServiceEntry
from konsul.sync.devices import DeviceRecord
from konsul.sync.hlc import Stamp
from konsul.sync.kv import encode_payload
from konsul.sync.versioned import version_id

SCOPES = ["s1", "global"]


def seed_http() -> list[bytes]:
    """Plain KV requests the fast path answers."""
    return [
        b"PUT /v1/kv/a/b?dc=s1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /v1/kv/a?raw HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    ]


def seed_mqtt_client() -> list[bytes]:
    """A device's session with the broker, and what a broker sends the agent's external-broker client."""
    return [
        codec.encode_connect("dev-1", username="dev-1", password="tok")
        + codec.encode_publish("devices/dev-1/telemetry", b'{"t":21.5}', qos=1, packet_id=1)
        + codec.encode_subscribe(2, [("devices/dev-1/desired", 1)])
        + codec.encode_pingreq()
        + codec.encode_disconnect(),
        codec.encode_connack(False, 0) + codec.encode_publish("kv/a", b"v", qos=1, packet_id=9, retain=True)
        + codec.encode_puback(3),
        # MQTT 5: properties, subscription options, reason codes.
        codec.encode_connect("dev-5", version=5, properties=codec.Properties(session_expiry_interval=60, receive_maximum=10),
                             will=("d/status", b"offline", 1, True), will_properties=codec.Properties(will_delay_interval=5))
        + codec.encode_publish("kv/a", b"v", 1, False, 3, version=5, properties=codec.Properties(
            topic_alias=1, message_expiry_interval=9, user_properties=(("k", "v"),)))
        + codec.encode_publish("", b"w", 0, version=5, properties=codec.Properties(topic_alias=1))
        + codec.encode_subscribe(4, [codec.Subscription("$share/g/kv/#", 1, False, True, 2)], version=5,
                                 properties=codec.Properties(subscription_identifiers=(7,)))
        + codec.encode_ack(codec.PUBREC, 5, 0x10, version=5) + codec.encode_disconnect(0x04, version=5),
    ]


def seed_mqtt_agent() -> list[bytes]:
    """What the agent sends a device: CONNACK, a retained desired state, PUBACK, SUBACK."""
    return [
        codec.encode_connack(False, 0)
        + codec.encode_publish("devices/dev-1/desired", b'{"mode":"eco"}', qos=1, packet_id=5, retain=True)
        + codec.encode_puback(1)
        + bytes([0x90, 3, 0, 2, 1]),
    ]


def seed_sync_frames() -> list[bytes]:
    """One frame of each kind a peer sends."""
    edge = sync_session.SyncSession("edge", "s1", "e1", SCOPES)
    state_vector = Doc().get_state()
    return [
        edge.start(),
        wire.encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": state_vector}),
        wire.encode({"t": "data", "n": 1, "s": "s1", "c": "kv", "e": 1, "u": seed_updates()[0]}),
        wire.encode({"t": "ack", "n": 1, "s": "s1", "c": "kv", "e": 1, "sv": b"\x01\x05\x02"}),
        wire.encode({"t": "eph", "s": "s1", "k": "presence", "d": {"dev-1": True}}),
        wire.encode({"t": "error", "code": "bye", "detail": "x"}),
    ]


def seed_documents() -> list[bytes]:
    """A device document in JSON and in CBOR, and some nesting."""
    return [b'{"mode":"eco","level":3,"on":true,"list":[1,2.5,null]}', cbor2.dumps({"t": 21.5, "n": [1, "x"]}), b"[[[]]]"]


def versions_update(entries: dict[str, object]) -> bytes:
    """A Yjs update that sets these entries in a collection's ``versions`` map."""
    doc = Doc()
    versions = doc.get("versions", type=Map)
    with doc.transaction():
        for name, value in entries.items():
            versions[name] = value
    return doc.get_update()


def seed_updates() -> list[bytes]:
    """Updates as replicas really send them: KV puts, a service, a device, a twin field."""
    stamp = Stamp(1_700_000_000_000, 0, "abcdefabcdef")
    record = DeviceRecord("dev-1", type="sensor", tags=("a",), attributes={"x": 1}, created_ms=1)
    service = ServiceEntry("n1", "web", "web", "10.0.0.1", 80, ("t",), {"m": "v"})
    return [
        versions_update({version_id("k", stamp): encode_payload(b"v", 0, None)}),
        versions_update({version_id("a/b", stamp): encode_payload(b"x" * 20, 7, 1_800_000_000_000)}),
        versions_update({version_id("n1/web", stamp): service.to_payload()}),
        versions_update({version_id("d/dev-1", stamp): record.to_payload()}),
        versions_update({version_id("desired/dev-1/mode", stamp): cbor2.dumps("eco")}),
    ]


def seed_link_formats() -> list[bytes]:
    """Registration payloads: resources with attributes, an absolute link with an anchor."""
    return [
        b'</sensors/temp>;rt="temperature-c";if="sensor";ct=0,</sensors/light>;rt="light-lux";obs',
        b'<coap://192.0.2.7/x>;anchor="coap://192.0.2.7";rel="alternate"',
        b"</a>,</b>;ct=40;title=\"b\"",
    ]

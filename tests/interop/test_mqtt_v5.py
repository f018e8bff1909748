"""MQTT 5 clients against a real `konsul edge`: paho-mqtt (protocol=MQTTv5) and mosquitto_pub/sub -V mqttv5.

Telemetry, KV writes (a QoS 1 PUBACK once durable; a refusal carries its
reason code instead of a silent drop), desired state with retained messages,
user events, topic aliases, the limits announced in CONNACK, and a
persistent session that queues while the device is away.
"""

from __future__ import annotations

import queue
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from gateway_edges import edge_http, mqtt_edge  # noqa: F401 - the module's fixtures edge and http
from agents import eventually
from test_mqtt_embedded import metric, mosquitto_pub, mosquitto_sub, register, stop_spawned  # noqa: F401 (fixture)


class Device5:
    """A paho-mqtt MQTT 5 client recording CONNACKs, SUBACKs, PUBACK reason codes and messages."""

    def __init__(self, port: int, device_id: str, token: str, *, clean_start: bool = True,
                 session_expiry: int | None = None) -> None:
        self.events: queue.Queue[tuple] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, token)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (rc.value, props, flags)))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.events.put(("subscribe", [r.value for r in codes]))
        self.client.on_publish = lambda c, u, mid, rc, props: self.events.put(("publish", (mid, rc.value)))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc.value))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        properties = None
        if session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=properties)
        self.client.loop_start()

    def event(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got[0] == kind:
                return got[1]

    def publish(self, topic: str, payload: bytes, qos: int = 1, properties: Properties | None = None) -> int:
        """Publish; the PUBACK's reason code (QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        mid, code = self.event("publish")
        assert mid == info.mid
        return code

    def message(self, topic: str, timeout: float = 10.0) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.topic == topic:
                return message

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_v5_client_connects_and_reads_the_limits_in_connack(edge, http):
    device = Device5(edge.mqtt_port, "five-1", register(http, "five-1"))
    try:
        code, props, _flags = device.event("connect")
        assert code == 0
        assert props.ReceiveMaximum >= 1 and props.TopicAliasMaximum >= 1 and props.MaximumPacketSize > 256 * 1024
    finally:
        device.close()
    # A wrong token: a v5 refusal the client reads, 0x86.
    bad = Device5(edge.mqtt_port, "five-1", "wrong")
    try:
        assert bad.event("connect")[0] == 0x86
    finally:
        bad.client.loop_stop()


def test_telemetry_and_kv_writes_acknowledged_refusals_with_reason_codes(edge, http):
    device = Device5(edge.mqtt_port, "five-2", register(http, "five-2", KVWrite=["five/"]))
    try:
        assert device.event("connect")[0] == 0
        received = metric(http, "konsul_mqtt_messages_received_total", kind="telemetry")
        assert device.publish("konsul/v1/devices/five-2/telemetry", b'{"t": 21.5}') == 0
        assert metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == received + 1
        assert device.publish("konsul/v1/kv/five/a", b"one") == 0
        assert http.get("/v1/kv/five/a?raw").text == "one"  # durable before the PUBACK
        # Refused, and told why: not authorized, payload format invalid, topic name invalid.
        assert device.publish("konsul/v1/kv/other/a", b"x") == 0x87
        assert device.publish("konsul/v1/devices/five-2/telemetry", b"not json") == 0x99
        assert device.publish("elsewhere/a", b"x") == 0x90
        assert http.get("/v1/kv/other/a").status_code == 404
        # A topic alias: set once, then the topic is left empty.
        alias = Properties(PacketTypes.PUBLISH)
        alias.TopicAlias = 1
        assert device.publish("konsul/v1/kv/five/b", b"first", properties=alias) == 0
        assert device.publish("", b"second", properties=alias) == 0
        assert http.get("/v1/kv/five/b?raw").text == "second"
    finally:
        device.close()


def test_desired_state_retained_and_user_events_reach_a_v5_subscriber(edge, http):
    device = Device5(edge.mqtt_port, "five-3", register(http, "five-3"))
    try:
        assert device.event("connect")[0] == 0
        published = metric(http, "konsul_mqtt_messages_published_total", kind="desired")
        assert http.put("/v1/devices/five-3/desired", json={"mode": "eco"}).status_code == 200
        # The agent publishes the new desired state once it is durable, just after the PUT is
        # answered; subscribing after that is what makes the message a retained one.
        eventually(lambda: metric(http, "konsul_mqtt_messages_published_total", kind="desired") > published,
                   what="the desired state published")
        desired = "konsul/v1/devices/five-3/desired"
        device.client.subscribe([(desired, 1), ("konsul/v1/events/+", 1)])
        assert device.event("subscribe") == [1, 1]
        message = device.message(desired)
        assert message.retain and b'"mode":"eco"' in message.payload  # retained, though set before
        assert http.put("/v1/event/fire/five-deploy", content=b"go").status_code == 200
        assert device.message("konsul/v1/events/five-deploy").payload.startswith(b"{")
    finally:
        device.close()


def test_a_persistent_v5_session_gets_what_was_queued_while_away(edge, http):
    token = register(http, "five-4")
    device = Device5(edge.mqtt_port, "five-4", token, clean_start=False, session_expiry=300)
    device.event("connect")
    device.client.subscribe("konsul/v1/kv/five4/#", 1)
    assert device.event("subscribe") == [1]
    device.close()
    assert http.put("/v1/kv/five4/while-away", content=b"queued").json() is True
    again = Device5(edge.mqtt_port, "five-4", token, clean_start=False, session_expiry=300)
    try:
        code, _props, flags = again.event("connect")
        assert code == 0 and flags.session_present
        assert again.message("konsul/v1/kv/five4/while-away").payload == b"queued"
    finally:
        again.close()


def test_mosquitto_clients_in_v5_mode(edge, http):
    token = register(http, "five-5", KVWrite=["five5/"])
    auth = ["-V", "mqttv5", "-i", "five-5", "-u", "five-5", "-P", token]
    done = mosquitto_pub(edge.mqtt_port, *auth, "-q", "1", "-t", "konsul/v1/kv/five5/k", "-m", "v5")
    assert done.returncode == 0, done.stderr
    assert http.get("/v1/kv/five5/k?raw").text == "v5"
    watcher = mosquitto_sub(edge.mqtt_port, *auth, "-q", "1", "-t", "konsul/v1/kv/five5/#")
    watcher.wait_for(r"konsul/v1/kv/five5/k v5")  # retained, from the store
    assert http.put("/v1/kv/five5/k", content=b"later").json() is True
    watcher.wait_for(r"konsul/v1/kv/five5/k later")

"""QoS 2 to devices, the end of a connection past the receive maximum, Wills on a take-over,
shared subscriptions: paho-mqtt (3.1.1 and 5.0) and raw sockets against a real `konsul edge`.
"""

from __future__ import annotations

import queue
import socket
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from gateway_edges import edge_http, mqtt_edge  # noqa: F401 - the module's fixtures edge and http
from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.server.connection import RECEIVE_MAXIMUM
from agents import eventually
from test_mqtt_embedded import metric, register


class Client:
    """A paho-mqtt client (3.1.1 or 5.0) recording CONNACKs, SUBACKs and messages."""

    def __init__(self, port: int, device_id: str, token: str, *, v5: bool = True, clean: bool = True,
                 session_expiry: int | None = None, receive_maximum: int | None = None,
                 will: tuple[str, bytes] | None = None) -> None:
        self.events: queue.Queue[tuple] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=protocol, **kwargs)
        self.client.username_pw_set(device_id, token)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (rc.value, flags)))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.events.put(("subscribe", [r.value for r in codes]))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc.value))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        properties = None
        if v5 and (session_expiry is not None or receive_maximum is not None):
            properties = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                properties.SessionExpiryInterval = session_expiry
            if receive_maximum is not None:
                properties.ReceiveMaximum = receive_maximum
        connect = {"clean_start": clean, "properties": properties} if v5 else {}
        self.client.connect("127.0.0.1", port, keepalive=30, **connect)
        self.client.loop_start()

    def event(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got[0] == kind:
                return got[1]

    def subscribe(self, topic: str, qos: int) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.event("subscribe")

    def message(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_qos2_subscription_gets_messages_at_qos2_through_pubrec_pubrel_pubcomp(edge, http):
    token = register(http, "qos2-a")
    # A receive maximum of 1: the second message can only come once the first one's
    # PUBREC/PUBREL/PUBCOMP exchange has ended and freed the window.
    device = Client(edge.mqtt_port, "qos2-a", token, receive_maximum=1)
    try:
        assert device.event("connect")[0] == 0
        assert device.subscribe("konsul/v1/kv/qos2a/#", 2) == [2]
        for n in range(3):
            assert http.put(f"/v1/kv/qos2a/k{n}", content=f"v{n}".encode()).json() is True
        got = [device.message() for _ in range(3)]
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            (f"konsul/v1/kv/qos2a/k{n}", f"v{n}".encode(), 2) for n in range(3)
        ]
    finally:
        device.close()


def test_delivered_qos_is_the_granted_one_for_311_clients(edge, http):
    token = register(http, "qos2-b")
    device = Client(edge.mqtt_port, "qos2-b", token, v5=False)
    try:
        assert device.event("connect")[0] == 0
        assert device.subscribe("konsul/v1/kv/qos2b/two/#", 2) == [2]
        assert device.subscribe("konsul/v1/kv/qos2b/zero/#", 0) == [0]
        assert http.put("/v1/kv/qos2b/two/k", content=b"2").json() is True
        assert http.put("/v1/kv/qos2b/zero/k", content=b"0").json() is True
        got = sorted((m.topic, m.qos) for m in (device.message(), device.message()))
        assert got == [("konsul/v1/kv/qos2b/two/k", 2), ("konsul/v1/kv/qos2b/zero/k", 0)]
    finally:
        device.close()


def test_qos2_messages_wait_for_a_persistent_session_away(edge, http):
    token = register(http, "qos2-c")
    device = Client(edge.mqtt_port, "qos2-c", token, clean=False, session_expiry=300)
    assert device.event("connect")[0] == 0
    assert device.subscribe("konsul/v1/kv/qos2c/#", 2) == [2]
    device.close()
    assert http.put("/v1/kv/qos2c/away", content=b"queued").json() is True
    again = Client(edge.mqtt_port, "qos2-c", token, clean=False, session_expiry=300)
    try:
        code, flags = again.event("connect")
        assert code == 0 and flags.session_present
        got = again.message()
        assert (got.topic, got.payload, got.qos) == ("konsul/v1/kv/qos2c/away", b"queued", 2)
    finally:
        again.close()


def test_past_the_receive_maximum_the_client_reads_disconnect_0x93(edge, http):
    """A client sending QoS 2 messages past the receive maximum, never releasing them, keeps sending
    for a while: it still reads the DISCONNECT 0x93 that says why, not a reset (docs/mqtt.md, MQTT 5)."""
    token = register(http, "qos2-flow")
    with socket.create_connection(("127.0.0.1", edge.mqtt_port), timeout=10) as sock:
        sock.sendall(codec.encode_connect("qos2-flow", username="qos2-flow", password=token, version=codec.MQTT_5))
        frames = codec.FrameSplitter(1 << 20)
        assert next_frame(sock, frames).type == codec.CONNACK
        topic = "konsul/v1/devices/qos2-flow/telemetry"
        pad = b"x" * 200  # over the edge's read size in all: input is still unread when it gives up
        burst = b"".join(codec.encode_publish(topic, b'{"n":%d,"pad":"%s"}' % (n, pad), 2, False, n,
                                              version=codec.MQTT_5)
                         for n in range(1, RECEIVE_MAXIMUM + 400))
        sock.sendall(burst)  # past the maximum, and on (a reset would fail this send or the reads below)
        while (frame := next_frame(sock, frames)).type != codec.DISCONNECT:
            pass
        assert codec.decode(frame, codec.MQTT_5).reason_code == 0x93
        assert sock.recv(65536) == b""  # then an orderly end of its output, not a reset


def next_frame(sock: socket.socket, frames: codec.FrameSplitter) -> codec.Frame:
    while (frame := frames.next_frame()) is None:
        data = sock.recv(65536)
        assert data, "the edge closed without a DISCONNECT"
        frames.feed(data)
    return frame


def status_received(http) -> float:
    return metric(http, "konsul_mqtt_messages_received_total", kind="status")


def test_a_connection_taken_over_sends_its_will(edge, http):
    token = register(http, "takeover-1")
    status = "konsul/v1/devices/takeover-1/status"
    first = socket.create_connection(("127.0.0.1", edge.mqtt_port), timeout=10)
    second = socket.create_connection(("127.0.0.1", edge.mqtt_port), timeout=10)
    try:
        first.sendall(codec.encode_connect("takeover-1", username="takeover-1", password=token,
                                           will=(status, b"offline", 1, True)))
        assert next_frame(first, codec.FrameSplitter(1 << 20)).type == codec.CONNACK
        before = status_received(http)
        second.sendall(codec.encode_connect("takeover-1", username="takeover-1", password=token))
        assert next_frame(second, codec.FrameSplitter(1 << 20)).type == codec.CONNACK
        assert first.recv(65536) == b""  # the first connection is closed (3.1.1: without a DISCONNECT)
        # Its Will went (a status message the device did not send itself), and the new connection is online.
        eventually(lambda: status_received(http) == before + 1, timeout=10, what="the Will of the connection taken over")
        assert http.get("/v1/devices/takeover-1").json()["Online"] is True
    finally:
        first.close()
        second.close()


def test_a_shared_subscription_group_passes_over_a_member_away(edge, http):
    away_token, here_token = register(http, "share-away"), register(http, "share-here")
    shared = "$share/workers/konsul/v1/kv/shq/#"
    away = Client(edge.mqtt_port, "share-away", away_token, clean=False, session_expiry=300)
    assert away.event("connect")[0] == 0
    assert away.subscribe(shared, 1) == [1]
    away.close()  # its session stays, subscribed, while it is away
    eventually(lambda: http.get("/v1/devices/share-away").json()["Online"] is False, timeout=10, what="share-away away")
    here = Client(edge.mqtt_port, "share-here", here_token)
    try:
        assert here.event("connect")[0] == 0
        assert here.subscribe(shared, 1) == [1]
        for n in range(4):
            assert http.put(f"/v1/kv/shq/k{n}", content=b"job").json() is True
        assert sorted(here.message().topic for _ in range(4)) == [f"konsul/v1/kv/shq/k{n}" for n in range(4)]
    finally:
        here.close()

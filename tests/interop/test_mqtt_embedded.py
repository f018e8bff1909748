"""The embedded MQTT broker of `konsul edge`, driven by mosquitto_pub/sub and paho-mqtt.

One edge for the module (devices authenticate with their tokens); every test
uses its own device ids and keys. Tests wait on conditions (output lines,
CONNACKs, polling with a deadline), never on fixed sleeps.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import time

import cbor2
import httpx
import paho.mqtt.client as mqtt
import pytest
from agents import AgentProcess, eventually
from gateway_edges import edge_http, mqtt_edge  # noqa: F401 - the module's fixtures edge and http
from konsul.protocols.mqtt import codec


# -- helpers (also used by the other test_mqtt_* modules) ---------------------------------


def register(http: httpx.Client, device_id: str, **fields) -> str:
    """Create a device over HTTP; its token."""
    response = http.put(f"/v1/devices/{device_id}", json={"Type": "sensor", **fields})
    assert response.status_code == 201, response.text
    return response.json()["Token"]


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


_spawned: list[AgentProcess] = []


@pytest.fixture(autouse=True)
def stop_spawned():
    """Stop every client process a test started, even when it fails half way."""
    yield
    while _spawned:
        _spawned.pop().stop()


def mosquitto_sub(port: int, *args: str) -> AgentProcess:
    """A running mosquitto_sub printing ``topic payload`` lines (stopped after the test)."""
    process = AgentProcess(["-h", "127.0.0.1", "-p", str(port), "-v", *args], command=["mosquitto_sub"])
    _spawned.append(process)
    return process


def mosquitto_pub(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=15
    )


class Device:
    """A paho-mqtt client that records what it gets, with waits on CONNACK and SUBACK."""

    def __init__(
        self, port: int, device_id: str, token: str | None, *, clean: bool = True, will: bytes | None = None,
        tls: dict | None = None,
    ) -> None:
        """``tls``: connect over TLS with these ``tls_set`` arguments (``ca_certs``, ``certfile``, ``keyfile``)."""
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=clean)
        if token is not None:
            self.client.username_pw_set(device_id, token)
        if will is not None:
            self.client.will_set(f"konsul/v1/devices/{device_id}/status", will, qos=1, retain=True)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", rc.value))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.events.put(("subscribe", [r.value for r in codes]))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc.value))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def event(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got[0] == kind:
                return got[1]

    def connected(self) -> int:
        return self.event("connect")

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.event("subscribe")

    def message(self, topic: str | None = None, timeout: float = 10.0) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic is None or message.topic == topic:
                return message

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_connect(port: int, device_id: str, token: str, keepalive: int = 30) -> socket.socket:
    """A bare socket past CONNACK, for sending what no client library would."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(codec.encode_connect(device_id, keepalive=keepalive, username=device_id, password=token))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


# -- tests ----------------------------------------------------------------------------------


def test_telemetry_at_qos_0_and_1_json_and_cbor(edge, http):
    token = register(http, "tele-1")
    before = metric(http, "konsul_mqtt_messages_received_total", kind="telemetry")
    for qos in ("0", "1"):
        done = mosquitto_pub(edge.mqtt_port, "-i", "tele-1", "-u", "tele-1", "-P", token, "-q", qos,
                             "-t", "konsul/v1/devices/tele-1/telemetry", "-m", '{"temp": 21.5}')
        assert done.returncode == 0, done.stderr
    device = Device(edge.mqtt_port, "tele-1", token)
    assert device.connected() == 0
    device.publish("konsul/v1/devices/tele-1/telemetry", cbor2.dumps({"temp": 22.0}), qos=1)
    eventually(lambda: metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == before + 3, what="3 samples")
    # Neither a JSON array nor a bare CBOR number is a sample: refused and counted.
    refused = metric(http, "konsul_mqtt_refused_total", reason="payload")
    device.publish("konsul/v1/devices/tele-1/telemetry", b"[1, 2]")
    device.publish("konsul/v1/devices/tele-1/reported", cbor2.dumps({"a": 1}))  # reported is JSON only
    eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="payload") == refused + 2, what="2 refusals")
    device.close()
    assert "refused (payload) from tele-1@" in edge.output


def test_kv_retained_both_ways(edge, http):
    token = register(http, "kv-1", KVWrite=["mq/"])
    # MQTT -> HTTP: a retained publish is a durable write.
    done = mosquitto_pub(edge.mqtt_port, "-i", "kv-1", "-u", "kv-1", "-P", token, "-q", "1", "-r",
                         "-t", "konsul/v1/kv/mq/from-mqtt", "-m", "blue")
    assert done.returncode == 0, done.stderr
    eventually(lambda: http.get("/v1/kv/mq/from-mqtt?raw").text == "blue", what="the MQTT write over HTTP")
    # HTTP -> MQTT: a live watcher gets every change, a late subscriber the retained value.
    watcher = Device(edge.mqtt_port, "kv-1", token)
    assert watcher.connected() == 0
    assert watcher.subscribe("konsul/v1/kv/mq/#") == [1]
    assert watcher.message("konsul/v1/kv/mq/from-mqtt").payload == b"blue"  # retained, from the store
    assert http.put("/v1/kv/mq/from-http", content=b"green").json() is True
    got = watcher.message("konsul/v1/kv/mq/from-http")
    assert got.payload == b"green" and got.qos == 1
    late = mosquitto_sub(edge.mqtt_port, "-i", "kv-late", "-t", "konsul/v1/kv/mq/from-http", "-C", "1",
                         "-u", "kv-late", "-P", register(http, "kv-late"))
    late.wait_for(r"konsul/v1/kv/mq/from-http green")
    assert late.proc.wait(10) == 0
    watcher.close()


def test_empty_retained_payload_deletes_the_key(edge, http):
    token = register(http, "kv-del", KVWrite=["gone/"])
    assert http.put("/v1/kv/gone/soon", content=b"x").json() is True
    watcher = Device(edge.mqtt_port, "kv-del", token)
    assert watcher.connected() == 0
    assert watcher.subscribe("konsul/v1/kv/gone/soon") == [1]
    assert watcher.message().payload == b"x"
    done = mosquitto_pub(edge.mqtt_port, "-i", "kv-del-pub", "-u", "kv-del-pub", "-P",
                         register(http, "kv-del-pub", KVWrite=["gone/"]), "-r", "-n", "-q", "1",
                         "-t", "konsul/v1/kv/gone/soon")
    assert done.returncode == 0, done.stderr
    assert watcher.message().payload == b""  # watchers see the deletion as an empty payload
    assert http.get("/v1/kv/gone/soon").status_code == 404
    watcher.close()


def test_last_will_marks_the_device_offline(edge, http):
    token = register(http, "will-1")
    status = "konsul/v1/devices/will-1/status"
    device = mosquitto_sub(edge.mqtt_port, "-i", "will-1", "-u", "will-1", "-P", token, "-q", "1", "-t", status,
                           "--will-topic", status, "--will-payload", "offline", "--will-retain", "--will-qos", "1")
    device.wait_for(rf"{status} online")  # the agent's retained status, once connected
    assert http.get("/v1/devices/will-1").json()["Online"] is True
    device.proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker sends the Will
    device.stop()
    eventually(lambda: http.get("/v1/devices/will-1").json()["Online"] is False, what="offline")


def test_a_will_outside_the_own_status_topic_is_refused(edge, http):
    token = register(http, "will-2")
    done = mosquitto_pub(edge.mqtt_port, "-i", "will-2", "-u", "will-2", "-P", token, "-t",
                         "konsul/v1/devices/will-2/telemetry", "-m", "{}",
                         "--will-topic", "konsul/v1/kv/config", "--will-payload", "pwned")
    assert done.returncode != 0 and "not authori" in done.stderr


def test_wrong_password_is_refused_and_leaves_the_real_device_alone(edge, http):
    token = register(http, "pw-1")
    device = Device(edge.mqtt_port, "pw-1", token)
    assert device.connected() == 0
    assert device.subscribe("konsul/v1/kv/pw/#") == [1]
    refused = metric(http, "konsul_mqtt_refused_total", reason="auth")
    for args in (["-P", "not-the-token"], []):  # a wrong token; no credentials at all
        done = mosquitto_pub(edge.mqtt_port, "-i", "pw-1", "-u", "pw-1", *args, "-t",
                             "konsul/v1/devices/pw-1/telemetry", "-m", "{}")
        assert done.returncode != 0 and "bad user name or password" in done.stderr
    assert metric(http, "konsul_mqtt_refused_total", reason="auth") == refused + 2
    # The connected device was neither kicked nor lost its subscription.
    assert http.put("/v1/kv/pw/still", content=b"here").json() is True
    assert device.message("konsul/v1/kv/pw/still").payload == b"here"
    assert http.get("/v1/devices/pw-1").json()["Online"] is True
    device.close()


def test_publishing_and_subscribing_outside_the_allowance_is_refused(edge, http):
    token = register(http, "acl-1", KVRead=["acl/public/"])
    register(http, "acl-2")
    assert http.put("/v1/kv/acl/public/x", content=b"1").json() is True
    forbidden = metric(http, "konsul_mqtt_refused_total", reason="forbidden")
    outside = metric(http, "konsul_mqtt_refused_total", reason="topic")
    device = Device(edge.mqtt_port, "acl-1", token)
    assert device.connected() == 0
    device.publish("konsul/v1/kv/acl/public/x", b"overwritten", retain=True)  # read-only device
    device.publish("konsul/v1/devices/acl-2/telemetry", b"{}")  # another device's topic
    device.publish("konsul/v1/devices/acl-1/desired", b"{}")  # written by the agent only
    device.publish("somewhere/else", b"x")  # outside the contract
    assert device.subscribe("konsul/v1/devices/acl-2/desired") == [128]
    assert device.subscribe("konsul/v1/kv/acl/secret/#") == [128]
    assert device.subscribe("#") == [128]
    assert device.subscribe("konsul/v1/kv/acl/public/#") == [1]
    assert device.message("konsul/v1/kv/acl/public/x").payload == b"1"
    eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="forbidden") == forbidden + 5, what="5 forbidden")
    assert metric(http, "konsul_mqtt_refused_total", reason="topic") == outside + 2
    assert http.get("/v1/kv/acl/public/x?raw").text == "1"
    device.close()


def test_malformed_and_oversized_packets_close_only_their_connection(edge, http):
    token = register(http, "bad-1")
    watcher = Device(edge.mqtt_port, "bad-watch", register(http, "bad-watch"))
    assert watcher.connected() == 0
    assert watcher.subscribe("konsul/v1/kv/bad/#") == [1]
    malformed = metric(http, "konsul_mqtt_refused_total", reason="malformed")
    too_large = metric(http, "konsul_mqtt_refused_total", reason="too_large")
    for junk in (
        b"\xf0\x00",  # reserved packet type 15
        b"\x32\x05\x00\x03a+b",  # PUBLISH to a wildcard topic
        b"\x82\xff\xff\xff\xff\x01",  # remaining length of five bytes
        codec.encode_connect("bad-1"),  # a second CONNECT
    ):
        sock = raw_connect(edge.mqtt_port, "bad-1", token)
        sock.sendall(junk)
        assert closed_by_peer(sock)
        sock.close()
    for oversized in (
        codec.encode_publish("konsul/v1/devices/bad-1/telemetry", b"x" * (300 * 1024)),
        b"\x30\x80\x80\x80\x7f",  # declares 256 MB: refused from the header, nothing buffered
    ):
        sock = raw_connect(edge.mqtt_port, "bad-1", token)
        sock.sendall(oversized)
        assert closed_by_peer(sock)
        sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="malformed") == malformed + 4
    assert metric(http, "konsul_mqtt_refused_total", reason="too_large") == too_large + 2
    # A payload just over 256 KiB with a real client: refused too.
    device = Device(edge.mqtt_port, "bad-1", token)
    assert device.connected() == 0
    device.client.publish("konsul/v1/devices/bad-1/telemetry", b"{}".ljust(256 * 1024 + 1), qos=0)
    assert device.event("disconnect") != 0
    device.client.loop_stop()
    assert metric(http, "konsul_mqtt_refused_total", reason="too_large") == too_large + 3
    # Everyone else carried on.
    assert http.put("/v1/kv/bad/after", content=b"fine").json() is True
    assert watcher.message("konsul/v1/kv/bad/after").payload == b"fine"
    watcher.close()


def test_silence_past_one_and_a_half_keepalives_ends_the_connection(edge, http):
    token = register(http, "quiet-1")
    sock = raw_connect(edge.mqtt_port, "quiet-1", token, keepalive=1)
    assert http.get("/v1/devices/quiet-1").json()["Online"] is True
    started = time.monotonic()
    assert closed_by_peer(sock)  # within its 10 s timeout
    # Not before the keep-alive itself ran out: a quiet but live client is not cut off early.
    assert time.monotonic() - started > 1.0
    sock.close()
    eventually(lambda: http.get("/v1/devices/quiet-1").json()["Online"] is False, what="offline")


def test_qos1_kv_write_is_acknowledged_once_durable(edge, http):
    token = register(http, "ack-1", KVWrite=["ack/"])
    device = Device(edge.mqtt_port, "ack-1", token)
    assert device.connected() == 0
    for i in range(50):
        device.client.publish(f"konsul/v1/kv/ack/{i % 5}", str(i).encode(), qos=1, retain=True)
    info = device.client.publish("konsul/v1/kv/ack/last", b"done", qos=1, retain=True)
    info.wait_for_publish(10)
    # PUBACK came after the write was durable, so it reads back at once.
    assert http.get("/v1/kv/ack/last?raw").text == "done"
    assert [http.get(f"/v1/kv/ack/{k}?raw").text for k in range(5)] == ["45", "46", "47", "48", "49"]
    device.close()


def test_desired_and_status_topics_are_the_devices_own(edge, http):
    token = register(http, "own-1")
    device = Device(edge.mqtt_port, "own-1", token)
    assert device.connected() == 0
    assert device.subscribe("konsul/v1/devices/own-1/#") == [1]
    assert device.message("konsul/v1/devices/own-1/status").payload == b"online"
    device.publish("konsul/v1/devices/own-1/status", b"sleeping")  # online or offline only
    eventually(lambda: "status is 'online' or 'offline'" in edge.output, what="the refusal in the log")
    device.close()
    assert json.loads(http.get("/v1/devices/own-1").content)["Protocol"] == "mqtt"


def test_qos2_publishes_complete_their_handshake(edge, http):
    token = register(http, "q2-1", KVWrite=["q2/"])
    before = metric(http, "konsul_mqtt_messages_received_total", kind="telemetry")
    for topic, message in (("konsul/v1/devices/q2-1/telemetry", '{"n": 2}'), ("konsul/v1/kv/q2/k", "two")):
        done = mosquitto_pub(edge.mqtt_port, "-i", "q2-1", "-u", "q2-1", "-P", token, "-q", "2", "-t", topic, "-m", message)
        assert done.returncode == 0, done.stderr  # PUBREC, PUBREL, PUBCOMP all went through
    assert metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == before + 1
    assert http.get("/v1/kv/q2/k?raw").text == "two"  # PUBREC came once it was durable


def test_packets_sent_with_the_connect_are_handled_after_it(edge, http):
    """A client may pipeline: CONNECT, SUBSCRIBE and PUBLISH in one write, before any CONNACK."""
    token = register(http, "pipe-1", KVWrite=["pipe/"])
    sock = socket.create_connection(("127.0.0.1", edge.mqtt_port), timeout=10)
    sock.sendall(codec.encode_connect("pipe-1", username="pipe-1", password=token)
                 + codec.encode_subscribe(3, [("konsul/v1/kv/pipe/#", 1)])
                 + codec.encode_publish("konsul/v1/kv/pipe/k", b"v", 1, packet_id=4))
    splitter = codec.FrameSplitter(1 << 20)
    seen: list = []
    while not any(isinstance(p, codec.Publish) for p in seen):
        data = sock.recv(4096)
        assert data, seen
        splitter.feed(data)
        while (frame := splitter.next_frame()) is not None:
            seen.append(codec.decode(frame))
    assert seen[0] == codec.Connack(False, 0)
    assert codec.Suback(3, [1]) in seen and codec.Ack(codec.PUBACK, 4) in seen
    sock.close()

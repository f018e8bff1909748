"""Hostile MQTT input against a real `konsul edge`: nothing a LAN peer sends stops, wedges or exhausts it.

Raw sockets send what no client library would; paho-mqtt and mosquitto_pub
check that real clients are still served afterwards. Tests wait on
conditions (replies, output lines, metrics polled with a deadline), never on
fixed sleeps.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

import cbor2
import httpx
import paho.mqtt.client as mqtt
from agents import AgentProcess, EdgeProcess, eventually
from gateway_edges import edge_http, mqtt_edge  # noqa: F401 - the module's fixtures edge and http
from test_mqtt_embedded import Device, closed_by_peer, metric, mosquitto_pub, raw_connect, register

from konsul.protocols.mqtt import codec


# -- helpers ---------------------------------------------------------------------------


def limited_edge(data_dir: Path, nofile: int, extra: list[str]) -> EdgeProcess:
    """`konsul edge` with RLIMIT_NOFILE set to ``nofile`` (through prlimit) from its start."""
    process = EdgeProcess.__new__(EdgeProcess)
    AgentProcess.__init__(
        process,
        ["edge", "--site", "s1", "--node", "n1", "--data-dir", str(data_dir), "--http-addr", "127.0.0.1:0",
         "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "", "--hub-url", "", "--acl", "off", *extra],
        command=["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "konsul.cli"],
    )
    process._ready(data_dir)
    process.mqtt_host, process.mqtt_port = process.mqtt_addr()
    return process


def open_fds(process: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{process.proc.pid}/fd"))


def read_frame(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole MQTT packet from ``sock`` (header included); b"" if the peer closed first."""
    sock.settimeout(timeout)

    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    try:
        raw = bytearray(take(1))
        length, multiplier = 0, 1
        while True:
            byte = take(1)
            raw += byte
            length += (byte[0] & 0x7F) * multiplier
            multiplier *= 128
            if not byte[0] & 0x80:
                break
        return bytes(raw + take(length))
    except (EOFError, ConnectionResetError):
        return b""


def still_serving(edge: EdgeProcess, http: httpx.Client, device_id: str) -> None:
    """The edge is up, answers HTTP, and a real MQTT client gets its publish acknowledged and stored."""
    assert edge.proc.poll() is None, edge.output
    token = register(http, device_id, KVWrite=["alive/"])
    done = mosquitto_pub(edge.mqtt_port, "-i", device_id, "-u", device_id, "-P", token, "-q", "1", "-r",
                         "-t", f"konsul/v1/kv/alive/{device_id}", "-m", "yes")
    assert done.returncode == 0, done.stderr
    assert http.get(f"/v1/kv/alive/{device_id}?raw").text == "yes"


def publish_frame(topic: bytes, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"") + payload
    return codec.pack_frame((codec.PUBLISH << 4) | (qos << 1), body)


# -- finding 3: file descriptors and connection caps -----------------------------------------


def test_out_of_file_descriptors_the_broker_backs_off_and_recovers(tmp_path):
    nofile = 160
    edge = limited_edge(tmp_path / "edge", nofile, [])
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            token = register(http, "fd-1")
            # HTTP requests with a complete head and a partial body hold a descriptor each, and
            # so do MQTT connections that have not sent CONNECT yet; each listener caps itself
            # below the limit, so both together are needed to take every descriptor.
            while open_fds(edge) < nofile:
                for _ in range(10):
                    sock = socket.create_connection((edge.host, edge.port))
                    sock.sendall(b"PUT /v1/kv/held HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
                    held.append(sock)
                    held.append(socket.create_connection((edge.mqtt_host, edge.mqtt_port)))
                if len(held) > 2 * nofile:
                    break
            eventually(lambda: open_fds(edge) >= nofile, what="every descriptor taken")
            # The next MQTT connections find no descriptor: the broker backs off, the agent stays.
            waiting = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
            waiting.sendall(codec.encode_connect("fd-1", username="fd-1", password=token))
            for _ in range(10):
                held.append(socket.create_connection((edge.mqtt_host, edge.mqtt_port)))
            edge.wait_for(r"MQTT accept failed \(Too many open files\)")
            assert edge.proc.poll() is None
            for sock in held:
                sock.close()
            held.clear()
            # Descriptors free again: the connection that waited in the backlog is served...
            assert read_frame(waiting) == b"\x20\x02\x00\x00"
            waiting.close()
            # ...and so are new ones, over MQTT and HTTP.
            eventually(lambda: http.get("/v1/status/leader").status_code == 200, what="HTTP again")
            still_serving(edge, http, "fd-2")
            assert metric(http, "konsul_mqtt_refused_total", reason="accept") >= 1
    finally:
        for sock in held:
            sock.close()
        edge.stop()


def test_connections_over_the_cap_are_closed_before_anything_is_read(tmp_path):
    # The total cap follows the open-files limit (3/4 of it): 150 of 200 here.
    edge = limited_edge(tmp_path / "edge", 200, [])
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            for _ in range(170):
                held.append(socket.create_connection((edge.mqtt_host, edge.mqtt_port)))

            def refused() -> int:
                return metric(http, "konsul_mqtt_refused_total", reason="connections")

            eventually(lambda: refused() >= 20, what="20 connections refused")
            assert refused() == 20  # exactly those past the cap of 150
            closed = 0
            for sock in held:
                sock.setblocking(False)
                try:
                    closed += sock.recv(1) == b""
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed += 1
            assert closed == 20
            edge.wait_for(r"refused an MQTT connection from 127\.0\.0\.1: 150 connections held in total \(at most 150\)")
            # The log is limited per source: 20 refusals, a handful of lines.
            assert edge.output.count("refused an MQTT connection from 127.0.0.1") <= 5
            assert http.get("/v1/status/leader").status_code == 200  # HTTP had descriptors left
            for sock in held:
                sock.close()
            held.clear()
            still_serving(edge, http, "cap-1")  # places are given back when connections end
    finally:
        for sock in held:
            sock.close()
        edge.stop()


def test_a_connection_that_never_sends_a_whole_connect_is_closed(edge, http):
    before = metric(http, "konsul_mqtt_refused_total", reason="timeout")
    silent = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    partial = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    partial.sendall(codec.encode_connect("slow-1")[:6])  # half a CONNECT, then nothing
    assert closed_by_peer(silent, timeout=15) and closed_by_peer(partial, timeout=15)  # after 10 s
    silent.close()
    partial.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="timeout") == before + 2
    still_serving(edge, http, "slow-2")


# -- finding 7: '$' topics, refused connects in the log ---------------------------------------


def test_qos_1_and_2_publishes_to_dollar_topics_are_acknowledged_and_dropped(edge, http):
    token = register(http, "dollar-1")
    refused = metric(http, "konsul_mqtt_refused_total", reason="topic")
    sock = raw_connect(edge.mqtt_port, "dollar-1", token)
    sock.sendall(publish_frame(b"$SYS/broker/x", b"1", 1, 7))
    assert read_frame(sock) == codec.encode_puback(7)
    sock.sendall(publish_frame(b"$share/g/konsul/v1/kv/x", b"2", 2, 8))
    assert read_frame(sock) == codec.encode_pubrec(8)
    sock.sendall(bytes([0x62, 2, 0, 8]))  # PUBREL 8
    assert read_frame(sock) == codec.encode_pubcomp(8)
    sock.sendall(codec.encode_pingreq())
    assert read_frame(sock) == b"\xd0\x00"  # still connected
    sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="topic") == refused + 2
    assert http.get("/v1/kv/x").status_code == 404


def test_refused_connects_are_logged_a_few_lines_per_source(edge, http):
    register(http, "noisy-1")
    before = metric(http, "konsul_mqtt_refused_total", reason="auth")
    for _ in range(30):
        sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
        sock.sendall(codec.encode_connect("noisy-1", username="noisy-1", password="wrong"))
        assert read_frame(sock) == codec.encode_connack(False, codec.BAD_CREDENTIALS)
        sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="auth") == before + 30  # every one counted
    assert edge.output.count("refused (auth) from noisy-1@") <= 5  # a few logged


# -- finding 4 and the shared document rules ---------------------------------------------------


def test_a_deeply_nested_payload_is_dropped_and_the_edge_restarts(tmp_path):
    data_dir = tmp_path / "edge"
    edge = EdgeProcess(data_dir, extra=["--acl", "off", "--mqtt-addr", "127.0.0.1:0"])
    try:
        port = edge.mqtt_addr()[1]
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            token = register(http, "deep-1")
            device = Device(port, "deep-1", token)
            assert device.connected() == 0
            device.publish("konsul/v1/devices/deep-1/reported", b'{"fw": "1.0"}')
            eventually(lambda: http.get("/v1/devices/deep-1/reported").json() == {"fw": "1.0"}, what="reported")
            refused = metric(http, "konsul_mqtt_refused_total", reason="payload")
            deep_json = b'{"a":' * 900 + b"1" + b"}" * 900
            deep_cbor = b"\xa1\x61a" * 900 + b"\x01"
            device.publish("konsul/v1/devices/deep-1/reported", deep_json, qos=1)  # PUBACK: dropped, not lost
            device.publish("konsul/v1/devices/deep-1/telemetry", deep_cbor, qos=1)
            device.publish("konsul/v1/devices/deep-1/reported", b'{"n": NaN}', qos=1)
            eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="payload") == refused + 3, what="3 refused")
            assert http.get("/v1/devices/deep-1/reported").json() == {"fw": "1.0"}  # nothing changed
            device.close()
        edge.stop()
        edge = EdgeProcess(data_dir, extra=["--acl", "off", "--mqtt-addr", "127.0.0.1:0"])
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            assert http.get("/v1/devices/deep-1/reported").json() == {"fw": "1.0"}
    finally:
        edge.stop()


def test_anonymous_devices_are_counted_for_their_cap_and_expiry(tmp_path):
    edge = EdgeProcess(tmp_path / "edge", extra=["--acl", "off", "--mqtt-addr", "127.0.0.1:0", "--allow-anonymous"])
    try:
        port = edge.mqtt_addr()[1]
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            for device_id in ("anon-1", "anon-2", "anon-1"):
                done = mosquitto_pub(port, "-i", device_id, "-q", "1", "-t", f"konsul/v1/devices/{device_id}/telemetry",
                                     "-m", '{"t": 1}')
                assert done.returncode == 0, done.stderr
            assert metric(http, "konsul_anonymous_devices_registered_total") == 2
            assert metric(http, "konsul_anonymous_devices") == 2
            assert metric(http, "konsul_anonymous_devices_refused_total") == 0
            assert metric(http, "konsul_anonymous_devices_expired_total") == 0
            assert http.get("/v1/devices/anon-1").json()["Type"] == "anonymous"
    finally:
        edge.stop()


# -- one packet or a few: other ways to crash, wedge or exhaust the broker -----------------------


def test_connects_of_other_versions_are_answered_in_a_form_their_clients_read(edge, http):
    refused = metric(http, "konsul_mqtt_refused_total", reason="protocol")
    # MQTT 5 is served: without a token, a v5 refusal (0x86, bad user name or password) with properties.
    connect = codec.pack_frame(codec.CONNECT << 4, b"\x00\x04MQTT\x05\x02\x00\x1e\x00" + b"\x00\x05v5-01")
    sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    sock.sendall(connect)
    assert read_frame(sock) == b"\x20\x03\x00\x86\x00"
    assert closed_by_peer(sock)
    sock.close()
    # A level this broker does not speak: MQTT 5's form of "unsupported protocol version" for 6...
    sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    sock.sendall(codec.pack_frame(codec.CONNECT << 4, b"\x00\x04MQTT\x06\x02\x00\x1e\x00\x00\x05v6-01"))
    assert read_frame(sock) == b"\x20\x03\x00\x84\x00"
    sock.close()
    # ...and an MQTT 3.1 client still gets the 3.1.1 form, code 1.
    sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    sock.sendall(codec.pack_frame(codec.CONNECT << 4, b"\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x05v3-01"))
    assert read_frame(sock) == b"\x20\x02\x00\x01"
    sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="protocol") == refused + 2
    still_serving(edge, http, "v5-alive")


def test_malformed_connects_and_subscribes_close_their_connection(edge, http):
    token = register(http, "junk-1")
    malformed = metric(http, "konsul_mqtt_refused_total", reason="malformed")
    limit = metric(http, "konsul_mqtt_refused_total", reason="limit")
    # Invalid UTF-8 in the client id, and in a topic; a SUBSCRIBE with packet id 0.
    sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    sock.sendall(codec.pack_frame(codec.CONNECT << 4, b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x03a\xffb"))
    assert closed_by_peer(sock)
    sock.close()
    for junk in (
        publish_frame(b"konsul/v1/kv/\xed\xa0\x80", b"x", 0, 0),  # an encoded surrogate
        codec.pack_frame((codec.SUBSCRIBE << 4) | 2, b"\x00\x00" + b"\x00\x03a/b\x00"),
        codec.pack_frame((codec.UNSUBSCRIBE << 4) | 2, b"\x00\x00" + b"\x00\x03a/b"),
    ):
        sock = raw_connect(edge.mqtt_port, "junk-1", token)
        sock.sendall(junk)
        assert closed_by_peer(sock)
        sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="malformed") == malformed + 4
    # A SUBSCRIBE naming thousands of filters: refused from its count, not processed one by one.
    sock = raw_connect(edge.mqtt_port, "junk-1", token)
    sock.sendall(codec.encode_subscribe(1, [(f"konsul/v1/kv/many/{i}", 1) for i in range(5000)]))
    assert closed_by_peer(sock)
    sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="limit") == limit + 1
    # A zero-length client id is refused with CONNACK 2.
    sock = socket.create_connection((edge.mqtt_host, edge.mqtt_port))
    sock.sendall(codec.encode_connect(""))
    assert read_frame(sock) == codec.encode_connack(False, codec.IDENTIFIER_REJECTED)
    sock.close()
    still_serving(edge, http, "junk-alive")


def test_misplaced_wildcards_and_too_many_subscriptions_get_suback_0x80(edge, http):
    token = register(http, "subs-1")
    topic = metric(http, "konsul_mqtt_refused_total", reason="topic")
    sock = raw_connect(edge.mqtt_port, "subs-1", token)  # paho would not send these
    sock.sendall(codec.encode_subscribe(5, [("konsul/v1/kv/a#", 1), ("konsul/v1/kv/#/b", 1), ("konsul/v1/kv/a+/b", 1)]))
    assert read_frame(sock) == b"\x90\x05\x00\x05\x80\x80\x80"
    sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="topic") == topic + 3
    device = Device(edge.mqtt_port, "subs-1", token)
    assert device.connected() == 0
    limit = metric(http, "konsul_mqtt_refused_total", reason="limit")
    for start in range(0, 1000, 250):
        device.client.subscribe([(f"konsul/v1/kv/subs/{i}", 0) for i in range(start, start + 250)])
        assert device.event("subscribe") == [0] * 250
    assert device.subscribe("konsul/v1/kv/subs/one-more", 0) == [128]  # the 1001st
    assert device.subscribe("konsul/v1/kv/subs/7", 1) == [1]  # one it holds: updated, not added
    assert metric(http, "konsul_mqtt_refused_total", reason="limit") == limit + 1
    assert http.put("/v1/kv/subs/7", content=b"seen").json() is True
    assert device.message("konsul/v1/kv/subs/7").payload == b"seen"
    device.close()


def test_qos_2_messages_never_released_are_bounded(edge, http):
    token = register(http, "rel-1")
    limit = metric(http, "konsul_mqtt_refused_total", reason="limit")
    sock = raw_connect(edge.mqtt_port, "rel-1", token)
    # A PUBREL for an id never seen is answered [MQTT-4.3.3-1].
    sock.sendall(bytes([0x62, 2, 0x12, 0x34]))
    assert read_frame(sock) == codec.encode_pubcomp(0x1234)
    # 1024 QoS 2 messages awaiting PUBREL are fine; the 1025th ends the connection.
    burst = b"".join(publish_frame(b"konsul/v1/devices/rel-1/telemetry", b"not json", 2, i) for i in range(1, 1025))
    sock.sendall(burst)
    for i in range(1, 1025):
        assert read_frame(sock) == codec.encode_pubrec(i)
    sock.sendall(publish_frame(b"konsul/v1/devices/rel-1/telemetry", b"not json", 2, 1025))
    assert closed_by_peer(sock)
    sock.close()
    assert metric(http, "konsul_mqtt_refused_total", reason="limit") == limit + 1
    still_serving(edge, http, "rel-alive")


def test_a_session_left_away_queues_a_bounded_number_of_messages(edge, http):
    token = register(http, "away-1")
    device = Device(edge.mqtt_port, "away-1", token, clean=False)
    assert device.connected() == 0
    assert device.subscribe("konsul/v1/kv/away/#") == [1]
    device.close()
    eventually(lambda: http.get("/v1/devices/away-1").json()["Online"] is False, what="away")
    overload = metric(http, "konsul_mqtt_refused_total", reason="overload")
    for start in range(0, 1100, 50):  # 1,100 changes in transactions of 50
        ops = [{"KV": {"Verb": "set", "Key": f"away/{i}", "Value": "eA=="}} for i in range(start, start + 50)]
        assert http.put("/v1/txn", content=json.dumps(ops)).status_code == 200
    eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="overload") >= overload + 100, what="100 dropped")
    assert metric(http, "konsul_mqtt_refused_total", reason="overload") == overload + 100
    still_serving(edge, http, "away-alive")


def test_cbor_telemetry_with_non_json_values_is_refused(edge, http):
    token = register(http, "cbor-1")
    device = Device(edge.mqtt_port, "cbor-1", token)
    assert device.connected() == 0
    refused = metric(http, "konsul_mqtt_refused_total", reason="payload")
    received = metric(http, "konsul_mqtt_messages_received_total", kind="telemetry")
    device.publish("konsul/v1/devices/cbor-1/telemetry", cbor2.dumps({"t": cbor2.CBORTag(1, 0)}))  # a tag
    device.publish("konsul/v1/devices/cbor-1/telemetry", cbor2.dumps({1: 2}))  # an integer key
    device.publish("konsul/v1/devices/cbor-1/telemetry", cbor2.dumps({"t": float("inf")}))
    eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="payload") == refused + 3, what="3 refused")
    assert metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == received
    device.close()


def test_many_connects_with_one_client_id_at_once_leave_exactly_one_connected(edge, http):
    token = register(http, "twin-conn", KVWrite=["tc/"])
    socks = [socket.create_connection((edge.mqtt_host, edge.mqtt_port)) for _ in range(20)]
    for sock in socks:  # all in flight together
        sock.sendall(codec.encode_connect("twin-conn", username="twin-conn", password=token, clean_session=False))
    # Each is answered or closed at once: none is left waiting without a CONNACK.
    answers = [read_frame(sock, timeout=10) for sock in socks]
    assert set(answers) <= {b"\x20\x02\x00\x00", b"\x20\x02\x01\x00", b""}, answers

    def still_open() -> list[socket.socket]:
        found = []
        for sock in socks:
            sock.setblocking(False)
            try:
                if sock.recv(1):
                    found.append(sock)
            except BlockingIOError:
                found.append(sock)
            except ConnectionResetError:
                pass
        return found

    eventually(lambda: len(still_open()) == 1, what="one connection left")
    survivor = still_open()[0]
    survivor.setblocking(True)
    survivor.sendall(codec.encode_publish("konsul/v1/kv/tc/k", b"one", 1, False, 9))
    assert read_frame(survivor) == codec.encode_puback(9)
    assert http.get("/v1/kv/tc/k?raw").text == "one"
    assert http.get("/v1/devices/twin-conn").json()["Online"] is True
    for sock in socks:
        sock.close()

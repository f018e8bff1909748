"""MQTT over TLS on a real `konsul edge`: mosquitto_pub/sub with --cafile, paho with tls_set.

Certificates come from trustme: a CA, a server certificate for 127.0.0.1 and
localhost, and client certificates for the --tls-verify-client tests. After
the handshake a TLS connection is an MQTT connection like any other (device
tokens, topic rules, presence); before it, a client that is not TLS, does not
trust the edge's CA, brings no certificate where one is required or stalls
loses that connection only, counted in
``konsul_tls_handshake_failures_total{interface="mqtt"}``.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from agents import AgentProcess, EdgeProcess, eventually, free_port
from test_mqtt_embedded import _spawned, Device, metric, mosquitto_pub, mosquitto_sub, register, stop_spawned  # noqa: F401
from test_mqtt_external import MOSQUITTO
from konsul.protocols.mqtt import codec


class Certificates:
    """A CA and what it signed, as PEM files in ``directory``."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.authority = trustme.CA()
        self.ca = directory / f"{name}.pem"
        self.authority.cert_pem.write_to_path(str(self.ca))
        self.cert, self.key = self.issue(directory, f"{name}-server", "127.0.0.1", "localhost")
        self.client_cert, self.client_key = self.issue(directory, f"{name}-client", "http-client")

    def issue(self, directory: Path, name: str, *identities: str) -> tuple[Path, Path]:
        issued = self.authority.issue_cert(*identities)
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cert, key


def tls_edge(data_dir: Path, certs: Certificates, *extra: str) -> EdgeProcess:
    """An edge serving MQTT over TLS on a free port (``mqtts_port``) with ``certs``' server certificate."""
    edge = EdgeProcess(data_dir, extra=[
        "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), "--mqtts-addr", "127.0.0.1:0", *extra,
    ])
    edge.mqtts_port = edge.mqtts_addr()[1]
    return edge


def http_client(edge: EdgeProcess, certs: Certificates) -> httpx.Client:
    # The edge may serve its HTTP API over TLS with the same files (and ask for
    # a client certificate); over plain HTTP the context is not used.
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return httpx.Client(base_url=edge.url, timeout=10, verify=context)


def closed_without_connack(sock: socket.socket) -> bool:
    """Read to the end: True if no CONNACK came (a TLS alert may)."""
    sock.settimeout(30)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return not data.startswith(b"\x20")


def tls_failures(http: httpx.Client) -> float:
    prefix = 'konsul_tls_handshake_failures_total{interface="mqtt",'
    return sum(float(line.split()[-1]) for line in http.get("/metrics").text.splitlines() if line.startswith(prefix))


def handshake_fails(port: int, context: ssl.SSLContext) -> bool:
    """True if a TLS handshake with ``context`` to ``port`` fails (either side may refuse it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                # TLS 1.3: a refused client certificate shows up at the first read.
                tls.sendall(codec.encode_connect("probe", keepalive=30))
                return tls.recv(4) == b""
        except (ssl.SSLError, ConnectionError):
            return True


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def edge(tmp_path_factory, certs) -> Iterator[EdgeProcess]:
    """Plain MQTT and MQTT over TLS side by side."""
    process = tls_edge(tmp_path_factory.mktemp("edge"), certs, "--mqtt-addr", "127.0.0.1:0")
    process.mqtt_port = process.mqtt_addr()[1]
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http(edge, certs) -> Iterator[httpx.Client]:
    with http_client(edge, certs) as client:
        yield client


def test_mosquitto_over_tls_writes_and_reads_kv_and_sends_telemetry(edge, http, certs):
    token = register(http, "tls-mq", KVWrite=["tls/"])
    tls = ["--cafile", str(certs.ca), "-i", "tls-mq", "-u", "tls-mq", "-P", token]
    done = mosquitto_pub(edge.mqtts_port, *tls, "-q", "1", "-r", "-t", "konsul/v1/kv/tls/from-mqtts", "-m", "blue")
    assert done.returncode == 0, done.stderr
    eventually(lambda: http.get("/v1/kv/tls/from-mqtts?raw").text == "blue", what="the TLS write over HTTP")
    before = metric(http, "konsul_mqtt_messages_received_total", kind="telemetry")
    done = mosquitto_pub(edge.mqtts_port, *tls, "-q", "1", "-t", "konsul/v1/devices/tls-mq/telemetry", "-m", '{"t": 1}')
    assert done.returncode == 0, done.stderr
    eventually(lambda: metric(http, "konsul_mqtt_messages_received_total", kind="telemetry") == before + 1, what="a sample")
    # HTTP -> MQTT over TLS: the retained value, then a live change.
    watcher = mosquitto_sub(edge.mqtts_port, *tls, "-q", "1", "-t", "konsul/v1/kv/tls/#", "-C", "2")
    watcher.wait_for(r"konsul/v1/kv/tls/from-mqtts blue")
    assert http.put("/v1/kv/tls/from-http", content=b"green").json() is True
    watcher.wait_for(r"konsul/v1/kv/tls/from-http green")
    assert watcher.proc.wait(10) == 0
    # The same device checks as on the plain port: a wrong token is refused (CONNACK 5).
    wrong = mosquitto_pub(edge.mqtts_port, "--cafile", str(certs.ca), "-i", "tls-mq", "-u", "tls-mq", "-P", "nope",
                          "-t", "konsul/v1/devices/tls-mq/telemetry", "-m", "{}")
    assert wrong.returncode != 0
    assert "refused (auth) from tls-mq@" in edge.output


def test_paho_with_tls_set_is_a_device_like_any_other(edge, http, certs):
    token = register(http, "tls-paho", KVWrite=["tls/paho/"])
    device = Device(edge.mqtts_port, "tls-paho", token, tls={"ca_certs": str(certs.ca)})
    try:
        assert device.connected() == 0
        assert http.get("/v1/devices/tls-paho").json()["Online"] is True
        assert device.subscribe("konsul/v1/kv/tls/paho/#") == [1]
        assert http.put("/v1/kv/tls/paho/cfg", content=b"on").json() is True
        assert device.message("konsul/v1/kv/tls/paho/cfg").payload == b"on"
        device.publish("konsul/v1/kv/tls/paho/back", b"ack", qos=1, retain=True)
        assert http.get("/v1/kv/tls/paho/back?raw").text == "ack"  # PUBACK came once durable
        # A value over several TLS records, both ways.
        big = bytes(range(256)) * 200  # 51,200 bytes
        device.publish("konsul/v1/kv/tls/paho/big", big, qos=1, retain=True)
        assert http.get("/v1/kv/tls/paho/big?raw").content == big
        assert device.message("konsul/v1/kv/tls/paho/big").payload == big
        # Outside its allowance: refused as on the plain port (SUBACK 0x80).
        assert device.subscribe("konsul/v1/devices/tls-mq/desired") == [0x80]
    finally:
        device.close()
    eventually(lambda: http.get("/v1/devices/tls-paho").json()["Online"] is False, what="offline")


def test_plaintext_wrong_ca_and_half_open_handshakes_end_only_their_connection(edge, http, certs, tmp_path):
    token = register(http, "tls-calm", KVWrite=["calm/"])
    calm = Device(edge.mqtts_port, "tls-calm", token, tls={"ca_certs": str(certs.ca)})
    assert calm.connected() == 0
    # Connected, then silent: a handshake that never starts holds its slot only until the deadline.
    half_open = socket.create_connection(("127.0.0.1", edge.mqtts_port), timeout=30)
    failures = tls_failures(http)
    # Plain MQTT on the TLS port: no CONNACK, the connection is closed.
    with socket.create_connection(("127.0.0.1", edge.mqtts_port), timeout=10) as plain:
        plain.sendall(codec.encode_connect("tls-calm", keepalive=30, username="tls-calm", password=token))
        assert closed_without_connack(plain)
    done = mosquitto_pub(edge.mqtts_port, "-i", "tls-calm", "-u", "tls-calm", "-P", token, "-t", "konsul/v1/kv/calm/x", "-m", "1")
    assert done.returncode != 0
    # A client that trusts another CA refuses the edge's certificate.
    other = Certificates(tmp_path / "other", "other")
    done = mosquitto_pub(edge.mqtts_port, "--cafile", str(other.ca), "-i", "tls-calm", "-u", "tls-calm", "-P", token,
                         "-t", "konsul/v1/kv/calm/x", "-m", "1")
    assert done.returncode != 0
    eventually(lambda: tls_failures(http) >= failures + 3, what="three failed handshakes counted")
    assert "refused (tls) from ?@127.0.0.1" in edge.output
    assert "not TLS (a plaintext MQTT client on the TLS port?)" in edge.output
    assert "the client does not trust our certificate" in edge.output
    # The connected device, the plain listener and new TLS clients never noticed.
    calm.publish("konsul/v1/kv/calm/still", b"here", qos=1, retain=True)
    assert http.get("/v1/kv/calm/still?raw").text == "here"
    calm.close()
    done = mosquitto_pub(edge.mqtt_port, "-i", "tls-calm", "-u", "tls-calm", "-P", token, "-q", "1",
                         "-t", "konsul/v1/kv/calm/plain", "-m", "1")
    assert done.returncode == 0, done.stderr
    # The silent connection is closed at the handshake deadline (protocols/tls.py HANDSHAKE_TIMEOUT_S), and counted.
    assert closed_without_connack(half_open)
    half_open.close()
    eventually(lambda: tls_failures(http) >= failures + 4, what="the stalled handshake counted")
    assert edge.proc.poll() is None


@pytest.fixture(scope="module")
def tls_only(tmp_path_factory, certs) -> Iterator[EdgeProcess]:
    """MQTT over TLS only (``--mqtt-addr ''``), every client with a certificate from the CA."""
    process = tls_edge(tmp_path_factory.mktemp("tls-only"), certs, "--mqtt-addr", "",
                       "--tls-ca", str(certs.ca), "--tls-verify-client", "on")
    yield process
    process.stop()


def test_with_mqtt_addr_empty_only_tls_is_served(tls_only, certs, tmp_path):
    assert "mqtt listening on" not in tls_only.output
    client_cert, client_key = certs.issue(tmp_path, "only-1", "only-1")
    with http_client(tls_only, certs) as http:
        token = register(http, "only-1", KVWrite=["only/"])
        done = mosquitto_pub(tls_only.mqtts_port, "--cafile", str(certs.ca), "--cert", str(client_cert),
                             "--key", str(client_key), "-i", "only-1", "-u", "only-1", "-P", token, "-q", "1", "-r",
                             "-t", "konsul/v1/kv/only/x", "-m", "tls")
        assert done.returncode == 0, done.stderr
        eventually(lambda: http.get("/v1/kv/only/x?raw").text == "tls", what="the write")


def test_verify_client_on_refuses_a_client_without_a_certificate(tls_only, certs, tmp_path):
    with http_client(tls_only, certs) as http:
        token = register(http, "cert-1")
        failures = tls_failures(http)
        done = mosquitto_pub(tls_only.mqtts_port, "--cafile", str(certs.ca), "-i", "cert-1", "-u", "cert-1", "-P", token,
                             "-t", "konsul/v1/devices/cert-1/telemetry", "-m", "{}")
        assert done.returncode != 0
        # A certificate from another CA is refused too.
        other = Certificates(tmp_path / "other", "other")
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.load_cert_chain(str(other.cert), str(other.key))
        assert handshake_fails(tls_only.mqtts_port, context)
        eventually(lambda: tls_failures(http) >= failures + 2, what="two refused handshakes counted")
        # Counted first, then logged: wait for the lines rather than read the output once.
        for line in ("no client certificate, and --tls-verify-client on requires one",
                     "the client certificate is not signed by --tls-ca"):
            eventually(lambda line=line: line in tls_only.output, what=f"the log line {line!r}")
        # With a certificate from the CA: connected, and the token still decides who it is.
        cert, key = certs.issue(tmp_path, "cert-1", "cert-1")
        device = Device(tls_only.mqtts_port, "cert-1", token,
                        tls={"ca_certs": str(certs.ca), "certfile": str(cert), "keyfile": str(key)})
        try:
            assert device.connected() == 0
        finally:
            device.close()
        assert tls_only.proc.poll() is None


def test_sighup_reloads_the_certificate_for_new_connections(tmp_path):
    first = Certificates(tmp_path / "first", "first")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    edge = EdgeProcess(tmp_path / "edge", extra=[
        "--tls-cert", str(cert), "--tls-key", str(key), "--mqtts-addr", "127.0.0.1:0",
    ])
    try:
        port = edge.mqtts_addr()[1]
        pid = edge.proc.pid
        with http_client(edge, first) as http:
            token = register(http, "reload-1", KVWrite=["reload/"])
            other_token = register(http, "reload-2")
            held = Device(port, "reload-1", token, tls={"ca_certs": str(first.ca)})
            assert held.connected() == 0
            second = Certificates(tmp_path / "second", "second")
            cert.write_bytes(second.cert.read_bytes())
            key.write_bytes(second.key.read_bytes())
            edge.proc.send_signal(signal.SIGHUP)
            edge.wait_for(r"SIGHUP: reloaded the TLS certificate")

            def publish(ca: Path) -> bool:
                return mosquitto_pub(port, "--cafile", str(ca), "-i", "reload-2", "-u", "reload-2", "-P", other_token,
                                     "-q", "1", "-t", "konsul/v1/devices/reload-2/telemetry", "-m", '{"n": 1}').returncode == 0

            assert publish(second.ca)
            assert not publish(first.ca)  # new connections get the new certificate only
            # The connection made before the reload goes on with the old one.
            held.publish("konsul/v1/kv/reload/held", b"still", qos=1, retain=True)
            held.close()
        # The HTTP API may serve the new certificate too: a client that trusts the new CA.
        with http_client(edge, second) as http:
            assert http.get("/v1/kv/reload/held?raw").text == "still"
        assert edge.proc.pid == pid and edge.proc.poll() is None
    finally:
        edge.stop()


def test_connections_are_admitted_against_the_caps_before_their_handshake(tmp_path, certs):
    edge = tls_edge(tmp_path / "edge", certs, "--mqtt-max-connections-per-source", "2")
    try:
        with http_client(edge, certs) as http:
            refused = metric(http, "konsul_mqtt_refused_total", reason="connections")
            # Two handshakes that never start hold this address's two places...
            stalled = [socket.create_connection(("127.0.0.1", edge.mqtts_port), timeout=30) for _ in range(2)]
            # ...so a third connection (accepted after them: one accept loop, in order) is
            # closed before any TLS is spoken: no ServerHello.
            with socket.create_connection(("127.0.0.1", edge.mqtts_port), timeout=10) as third:
                context = ssl.create_default_context(cafile=str(certs.ca))
                try:
                    context.wrap_socket(third, server_hostname="127.0.0.1").close()
                    handshook = True
                except (ssl.SSLError, ConnectionError):
                    handshook = False
            assert not handshook
            eventually(lambda: metric(http, "konsul_mqtt_refused_total", reason="connections") == refused + 1,
                       what="the refusal counted")
            assert "refused an MQTT connection from 127.0.0.1: 2 connections held by this address" in edge.output
            for sock in stalled:
                sock.close()
            # Places given back: a TLS client is served again.
            token = register(http, "capped-1")
            eventually(lambda: mosquitto_pub(edge.mqtts_port, "--cafile", str(certs.ca), "-i", "capped-1", "-u", "capped-1",
                                             "-P", token, "-t", "konsul/v1/devices/capped-1/telemetry",
                                             "-m", "{}").returncode == 0, what="a TLS client served")
    finally:
        edge.stop()


def tls_mosquitto(directory: Path, certs: Certificates) -> AgentProcess:
    """mosquitto with a TLS listener on a free port (``port``), anonymous clients allowed."""
    port = free_port()
    config = directory / "mosquitto.conf"
    # Started as root, mosquitto would read the files as user "mosquitto", who may not enter pytest's tmp.
    user = "user root\n" if os.geteuid() == 0 else ""
    config.write_text(f"listener {port} 127.0.0.1\ncertfile {certs.cert}\nkeyfile {certs.key}\n{user}"
                      "allow_anonymous true\npersistence false\nlog_dest stderr\n")
    broker = AgentProcess(["-c", str(config)], command=[MOSQUITTO])
    _spawned.append(broker)
    broker.wait_for(r"mosquitto version \S+ running")
    broker.port = port
    return broker


def test_an_external_broker_over_tls_with_a_pinned_ca(tmp_path, certs):
    broker = tls_mosquitto(tmp_path, certs)
    url = f"mqtts://127.0.0.1:{broker.port}"
    # A CA that did not sign the broker's certificate: no link, and the log says what to do.
    other = Certificates(tmp_path / "other", "other")
    wrong = EdgeProcess(tmp_path / "wrong", extra=["--mqtt-broker", url, "--mqtt-broker-ca", str(other.ca)])
    try:
        wrong.wait_for(r"cannot reach the MQTT broker 127.0.0.1:\d+ \(TLS: .*give --mqtt-broker-ca the CA")
    finally:
        wrong.stop()
    edge = EdgeProcess(tmp_path / "edge", extra=["--mqtt-broker", url, "--mqtt-broker-ca", str(certs.ca)])
    try:
        edge.wait_for(r"mqtt attached to the external broker 127.0.0.1:\d+ as konsul-edge-s1 \(TLS\)")
        assert "mqtts listening" not in edge.output
        with http_client(edge, certs) as http:
            done = mosquitto_pub(broker.port, "--cafile", str(certs.ca), "-q", "1", "-t", "konsul/v1/kv/ext-tls/a", "-m", "x")
            assert done.returncode == 0, done.stderr
            eventually(lambda: http.get("/v1/kv/ext-tls/a?raw").text == "x", what="the write through the TLS broker")
    finally:
        edge.stop()

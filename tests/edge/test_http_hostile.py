"""Hostile HTTP clients against a real `konsul edge`: none stops, wedges or poisons it.

Each test sends what an attacker on the LAN could (raw sockets where an HTTP
client library would not), then checks the agent still answers and that
nothing it acknowledged was lost or changed by the refused input.
"""

from __future__ import annotations

import json
import re
import resource
import socket
import sys
import threading
import weakref
from pathlib import Path

import httpx
import pytest

from agents import AgentProcess, EdgeProcess, eventually

LAUNCHER = Path(__file__).with_name("edge_with_limits.py")


class LimitedEdge(EdgeProcess):
    """`konsul edge` with some NetworkLimits set low (edge_with_limits.py)."""

    def __init__(self, data_dir: Path, limits: dict) -> None:
        AgentProcess.__init__(
            self,
            [
                "edge", "--site", "s1", "--node", "n1", "--data-dir", str(data_dir),
                "--http-addr", "127.0.0.1:0", "--mqtt-addr", "", "--coap-addr", "", "--hub-url", "", "--acl", "off",
            ],
            command=[sys.executable, str(LAUNCHER), json.dumps(limits)],
        )
        self._ready(data_dir)


@pytest.fixture
def limited_edge(tmp_path):
    started = []

    def start(**limits) -> LimitedEdge:
        process = LimitedEdge(tmp_path / f"edge{len(started)}", limits)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def shared_edge(tmp_path_factory):
    """One edge for the module, with ACLs off: these tests are about hostile input, not access control."""
    process = EdgeProcess(tmp_path_factory.mktemp("edge"), extra=["--acl", "off"])
    yield process
    process.stop()


@pytest.fixture
def http(shared_edge):
    with httpx.Client(base_url=shared_edge.url, timeout=10) as client:
        client.edge = shared_edge
        yield client


# -- helpers -------------------------------------------------------------------


def connect(edge: EdgeProcess, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect((edge.host, edge.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


_unread: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body; what follows it is kept for the next call."""
    data = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    _unread[sock] = body[length:]
    return int(lines[0].split(" ")[1]), headers, body[:length]


def metric(edge: EdgeProcess, name: str, labels: str = "") -> float:
    """A value from /metrics, read on a connection the agent has closed when this returns
    (so it no longer counts against the connection limits)."""
    with connect(edge) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = read_until_closed(sock).decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+]+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_serves(edge: EdgeProcess, key: str = "hostile/alive") -> None:
    """The agent is up, takes a write and reads it back."""
    assert edge.proc.poll() is None, edge.output
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        assert client.put(f"/v1/kv/{key}", content=b"ok").json() is True
        assert client.get(f"/v1/kv/{key}", params={"raw": ""}).content == b"ok"


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"], body
    return body


# -- finding 3: held connections -------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        # The fast path's request (a plain KV write) and the app's (anything else).
        b"PUT /v1/kv/hostile/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
        b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
    ],
    ids=["fast-path", "app"],
)
def test_body_slower_than_its_timeout_gets_408(limited_edge, head):
    edge = limited_edge(http_body_timeout_s=0.5)
    with connect(edge) as sock:
        sock.sendall(head + b"x" * 10)  # a tenth of the body, then nothing
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in answer
    assert httpx.get(f"{edge.url}/v1/kv/hostile/slow").status_code == 404
    assert metric(edge, "konsul_http_timeouts_total", 'phase="body"') >= 1
    assert_serves(edge)


def test_bodies_being_received_are_bounded_together(limited_edge):
    edge = limited_edge(http_body_bytes=32 * 1024)
    with connect(edge) as sock:
        sock.sendall(b"PUT /v1/kv/hostile/body HTTP/1.1\r\nHost: x\r\nContent-Length: 204800\r\n\r\n")
        try:
            for _ in range(25):
                sock.sendall(b"v" * 8192)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending
        answer = read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert metric(edge, "konsul_http_bodies_refused_total") == 1
    assert metric(edge, "konsul_http_body_bytes") == 0
    assert httpx.get(f"{edge.url}/v1/kv/hostile/body").status_code == 404
    assert_serves(edge)


def test_partial_head_is_closed_at_the_keep_alive_timeout(shared_edge):
    with connect(shared_edge) as sock:
        sock.sendall(b"PUT /v1/kv/hostile/head HTTP/1.1\r\nHost: x\r\n")  # never ends
        assert read_until_closed(sock) == b""
    assert_serves(shared_edge)


def test_connection_close_is_honoured(shared_edge):
    # A response with "Connection: close" used to leave the socket open until
    # the client left: one descriptor held per such request.
    for target in (b"/v1/kv/hostile/none", b"/v1/agent/self"):
        with connect(shared_edge) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 "), answer


def _blocking_query(edge: EdgeProcess, source: str, index: int) -> socket.socket:
    sock = connect(edge, source)
    sock.sendall(b"GET /v1/kv/hostile/held?index=%d&wait=60s HTTP/1.1\r\nHost: x\r\n\r\n" % index)
    return sock


def _refused(sock: socket.socket) -> bytes:
    """What a refused connection reads: a 503, or nothing before the close."""
    sock.sendall(b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
    if answer:
        assert b"retry-after: " in answer.lower() and b'"too_many_connections"' in answer
    return answer


def test_connections_are_capped_per_source_and_in_total(limited_edge):
    edge = limited_edge(http_connections_per_source=4, http_connections=9)
    index = int(httpx.get(f"{edge.url}/v1/kv/hostile/held").headers["X-Consul-Index"])
    # Blocking queries hold their connections legitimately; they count all the
    # same. Connections are admitted in the order they connected.
    # Only the scrape's own connection open (the agent may see a client's close late).
    eventually(lambda: metric(edge, "konsul_http_connections") == 1, what="no other connection")
    held = [_blocking_query(edge, "127.0.0.1", index) for _ in range(4)]
    with connect(edge, "127.0.0.1") as extra:
        _refused(extra)
    # Other addresses still get in, up to the total.
    held += [_blocking_query(edge, "127.0.0.2", index) for _ in range(4)]
    held.append(_blocking_query(edge, "127.0.0.4", index))
    with connect(edge, "127.0.0.3") as extra:
        _refused(extra)
    # A client that leaves gives its place back, even from a blocking query.
    for sock in held:
        sock.close()
    eventually(lambda: httpx.put(f"{edge.url}/v1/kv/hostile/held", content=b"w").json() is True, what="served")
    assert metric(edge, "konsul_http_connections_refused_total", 'limit="per_source"') >= 1
    assert metric(edge, "konsul_http_connections_refused_total", 'limit="total"') >= 1
    eventually(lambda: metric(edge, "konsul_http_connections") == 1, what="places released")
    assert_serves(edge)


def test_out_of_file_descriptors_backs_off_and_recovers(limited_edge):
    edge = limited_edge()
    pid = edge.proc.pid
    open_now = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    limit = open_now + 8
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held: list[socket.socket] = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, original[1]))
        # More connections than the agent has descriptors: the rest wait in the backlog.
        for _ in range(24):
            sock = connect(edge)
            sock.sendall(b"GET /v1/kv/hostile/fd?index=1000000 HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        eventually(lambda: "cannot accept HTTP connections" in edge.output, what="accept failing")
    finally:
        for sock in held:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    eventually(lambda: httpx.get(f"{edge.url}/health/live", timeout=5).status_code == 200, what="serving again")
    assert_serves(edge)
    assert metric(edge, "konsul_http_accept_errors_total") >= 1
    # Backing off is logged a few times, not a traceback every 100 ms.
    assert "Traceback" not in edge.output


def test_a_client_that_stops_reading_is_dropped(limited_edge):
    edge = limited_edge(http_send_timeout_s=0.5)
    value = b"v" * (512 * 1024)
    httpx.put(f"{edge.url}/v1/kv/hostile/big", content=value)
    with connect(edge) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Far more than the socket buffers hold, and never read.
        sock.sendall(b"GET /v1/kv/hostile/big?raw HTTP/1.1\r\nHost: x\r\n\r\n" * 64)
        eventually(lambda: metric(edge, "konsul_http_timeouts_total", 'phase="send"') >= 1, what="send timeout")
    eventually(lambda: metric(edge, "konsul_http_connections") <= 1, what="connection released")
    assert httpx.get(f"{edge.url}/v1/kv/hostile/big?raw").content == value
    assert_serves(edge)


# -- finding 7: keys, times and numbers --------------------------------------------


def test_a_key_that_is_not_utf8_is_refused(http):
    http.put("/v1/kv/hostile/utf8-seed", content=b"s")
    for method in ("PUT", "GET", "DELETE"):
        for key in ("bad%ffkey", "bad%fekey", "bad%c3key", "hostile/%ff"):
            response = http.request(method, f"/v1/kv/{key}", content=b"v" if method == "PUT" else None)
            assert_error(response, 400, "invalid_argument")
    assert not any("\ufffd" in key for key in http.get("/v1/kv/", params={"keys": ""}).json())
    # Escaped UTF-8 is a key like any other, through either path.
    assert http.put("/v1/kv/hostile/caf%C3%A9", content=b"c").json() is True
    assert http.get("/v1/kv/hostile/café", params={"raw": ""}).content == b"c"


@pytest.mark.parametrize("since", ["inf", "-inf", "nan", "-1e308", "1e308", "1e20", "99999999999999999999"])
def test_telemetry_times_out_of_range_are_refused(http, since):
    assert_error(http.get("/v1/devices/hostile-t/telemetry", params={"since": since}), 400, "invalid_argument")
    assert_error(http.get("/v1/telemetry", params={"type": "x", "until": since}), 400, "invalid_argument")


def test_nan_in_device_attributes_is_refused(http):
    for body in (b'{"Attributes": {"x": NaN}}', b'{"Attributes": {"x": Infinity}}', b'{"Attributes": {"x": -Infinity}}'):
        assert_error(http.put("/v1/devices/hostile-nan", content=body), 400, "invalid_argument")
    assert http.get("/v1/devices/hostile-nan").status_code == 404
    assert_serves(http.edge)


# -- the shared document rules on every JSON body ----------------------------------


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_a_desired_state_nested_900_deep_is_refused_and_changes_nothing(http):
    assert http.put("/v1/devices/hostile-deep", json={"Type": "sensor"}).status_code in (200, 201)
    assert http.put("/v1/devices/hostile-deep/desired", json={"interval": 5}).status_code == 200
    for method in ("PUT", "PATCH", "POST"):
        for side in ("desired", "reported"):
            response = http.request(method, f"/v1/devices/hostile-deep/{side}", content=nested(900))
            assert_error(response, 400, "invalid_argument")
    assert http.get("/v1/devices/hostile-deep/desired").json() == {"interval": 5}
    assert http.get("/v1/devices/hostile-deep/reported").json() == {}
    assert_serves(http.edge)


@pytest.mark.parametrize(
    "body",
    [nested(900), nested(33), b'{"x": NaN}', b'{"x": Infinity}', b'{"x": "\xff"}', b'{"x": 1e400}',
     b'{"x": 18446744073709551616}', b"[" * 100000],
    ids=["deep", "depth-33", "nan", "infinity", "not-utf8", "float-overflow", "int-65-bits", "brackets"],
)
@pytest.mark.parametrize(
    "method,path",
    [
        ("PUT", "/v1/agent/service/register"),
        ("PUT", "/v1/devices/hostile-doc"),
        ("PUT", "/v1/txn"),
        ("POST", "/v1/devices/hostile-deep/telemetry"),
        ("PATCH", "/v1/devices/hostile-deep/desired"),
    ],
)
def test_every_json_body_follows_the_document_rules(http, method, path, body):
    http.put("/v1/devices/hostile-deep", json={"Type": "sensor"})
    index = http.get("/v1/kv/hostile/none").headers["X-Consul-Index"]
    response = http.request(method, path, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_argument"
    assert http.get("/v1/kv/hostile/none").headers["X-Consul-Index"] == index  # nothing written


# -- finding 8: Consul semantics -----------------------------------------------------


def test_a_watcher_on_an_empty_store_waits_for_the_first_write(edge):
    missing = httpx.get(f"{edge.url}/v1/kv/first")
    assert missing.status_code == 404 and missing.content == b""
    index = int(missing.headers["X-Consul-Index"])
    assert index >= 1
    answers: list[httpx.Response] = []
    watcher = threading.Thread(
        target=lambda: answers.append(httpx.get(f"{edge.url}/v1/kv/first?index={index}&wait=30s", timeout=60))
    )
    watcher.start()
    # The watcher's connection is open (this scrape is the other one) ...
    eventually(lambda: metric(edge, "konsul_http_connections") >= 2, what="watcher connected")
    # ... and it has not answered: it waits for a change, not spins on index 1.
    assert not answers
    assert httpx.put(f"{edge.url}/v1/kv/first", content=b"1").json() is True
    watcher.join(60)
    woken = answers[0]
    assert woken.status_code == 200, "the watcher answered before the first write"
    assert int(woken.headers["X-Consul-Index"]) > index
    assert woken.json()[0]["ModifyIndex"] > index


def test_acquire_and_release_with_unknown_sessions_write_nothing(http):
    for query in ("acquire=5f6c8a3e-0000-0000-0000-000000000000", "release=x", "acquire="):
        assert_error(http.put(f"/v1/kv/hostile/lock?{query}", content=b"v"), 400, "invalid_session")
    assert_error(http.put("/v1/kv/hostile/lock?acquire=a&release=a", content=b"v"), 400, "invalid_argument")
    assert http.get("/v1/kv/hostile/lock").status_code == 404
    txn = [{"KV": {"Verb": "lock", "Key": "hostile/lock", "Value": "dg==", "Session": "x"}}]
    response = http.put("/v1/txn", json=txn)
    assert response.status_code == 409 and "invalid session" in response.json()["Errors"][0]["What"]
    assert http.get("/v1/kv/hostile/lock").status_code == 404


def test_unknown_endpoints_say_so(http):
    body = assert_error(http.get("/v1/nothing/here"), 404, "unknown_endpoint")
    assert "/v1/nothing/here" in body["detail"]
    assert_error(http.post("/v1/kv/hostile/x", content=b"v"), 405, "method_not_allowed")
    missing = http.get("/v1/kv/hostile/never-written")
    assert missing.status_code == 404 and missing.content == b""  # Consul's "no such key"


# -- anything else a few requests could do --------------------------------------------

NINES = "9" * 400


@pytest.mark.parametrize(
    "method,target",
    [
        ("GET", f"/v1/kv/hostile/p?index=1&wait={NINES}s"),
        ("GET", "/v1/kv/hostile/p?index=1&wait=-5s"),
        ("GET", "/v1/kv/hostile/p?index=1&wait=nan"),
        ("GET", "/v1/kv/hostile/p?index=-1"),
        ("GET", "/v1/kv/hostile/p?index=--5"),
        ("GET", "/v1/kv/hostile/p?index=%2B5"),
        ("GET", "/v1/kv/hostile/p?index=5_0"),
        ("GET", "/v1/kv/hostile/p?index=18446744073709551616"),
        ("GET", f"/v1/kv/hostile/p?index={NINES * 12}"),
        ("GET", "/v1/kv/hostile/p?index=abc"),
        ("PUT", f"/v1/kv/hostile/p?ttl={NINES}s"),
        ("PUT", f"/v1/kv/hostile/p?ttl={NINES}"),
        ("PUT", "/v1/kv/hostile/p?ttl=1e9"),
        ("PUT", "/v1/kv/hostile/p?ttl=forever"),
        ("PUT", "/v1/kv/hostile/p?ttl=0s"),
        ("PUT", "/v1/kv/hostile/p?flags=18446744073709551616"),
        ("PUT", "/v1/kv/hostile/p?flags=-1"),
        ("PUT", "/v1/kv/hostile/p?cas=x"),
        ("PUT", "/v1/kv/hostile/p?cas=--1"),
        ("DELETE", "/v1/kv/hostile/p?cas=1e3"),
        ("GET", "/v1/devices/hostile-t/telemetry?limit=99999999999999999999999"),
        ("GET", "/v1/catalog/services?index=1&wait=1e999s"),
        ("PUT", "/v1/agent/service/register"),
    ],
)
def test_hostile_query_parameters_get_400(http, method, target):
    body = json.dumps({"Name": "h", "Check": {"TTL": f"{NINES}s"}}) if "register" in target else b"v"
    index = http.get("/v1/kv/hostile/none").headers["X-Consul-Index"]
    response = http.request(method, target, content=body if method != "GET" else None)
    assert_error(response, 400, "invalid_argument")
    assert http.get("/v1/kv/hostile/none").headers["X-Consul-Index"] == index


def test_odd_separators_and_escapes_do_not_fail(http):
    http.put("/v1/kv/hostile/sep/a/b", content=b"1")
    for separator in ("/", "//", "%00", "%2F", "\u00e9", "a" * 600):
        response = http.get("/v1/kv/hostile/sep/", params={"keys": "", "separator": separator})
        assert response.status_code in (200, 404), response.text
    for target in ("/v1/kv/hostile/%", "/v1/kv/hostile/%zz", "/v1/kv/hostile/%2", "/v1/kv/%00", "/v1/kv/a%2F..%2Fb"):
        assert http.get(target).status_code in (400, 404)


def raw_exchange(edge: EdgeProcess, data: bytes) -> bytes:
    with connect(edge) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent
        return read_until_closed(sock)


@pytest.mark.parametrize(
    "request_bytes,statuses",
    [
        (b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", (b"400", b"431", b"")),
        # Arriving in one read, a head past h11's incomplete-event bound is still taken whole.
        (b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 5000 + b"\r\n", (b"200", b"400", b"431", b"")),
        (b"GET /v1/kv/" + b"k" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (b"400", b"414", b"431", b"")),
        (b"PUT /v1/kv/hostile/cl HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\nv", (b"400", b"413")),
        (b"PUT /v1/kv/hostile/cl HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nv", (b"400",)),
        (b"PUT /v1/kv/hostile/cl HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nvv", (b"400",)),
        (
            b"PUT /v1/kv/hostile/cl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"F" * 40 + b"\r\n" + b"v" * 1000,
            (b"400", b"413", b"408"),
        ),
        (b"PUT /v1/kv/hostile/cl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", (b"400", b"408")),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200, (b"400", b"")),
        (b"GET /v1/kv/hostile/cl HTTP/9.9\r\nHost: x\r\n\r\n", (b"400", b"404", b"505", b"")),
        (b"GET\x00/ HTTP/1.1\r\n\r\n", (b"400", b"")),
    ],
    ids=[
        "huge-header", "many-headers", "huge-target", "absurd-content-length", "negative-content-length",
        "two-content-lengths", "huge-chunk", "chunked-and-length", "tls-hello", "http-9.9", "nul",
    ],
)
def test_malformed_requests_are_refused_and_the_agent_serves_on(limited_edge, request_bytes, statuses):
    edge = limited_edge(http_body_timeout_s=1.0)
    answer = raw_exchange(edge, request_bytes)
    status = answer[9:12]
    assert status in statuses, answer[:300]
    assert httpx.get(f"{edge.url}/v1/kv/hostile/cl").status_code == 404
    assert_serves(edge)


def test_pipelined_requests_are_answered_in_order(shared_edge):
    with connect(shared_edge) as sock:
        writes = b"".join(
            b"PUT /v1/kv/hostile/pipe/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % (i, i % 10)
            for i in range(50)
        )
        reads = b"".join(b"GET /v1/kv/hostile/pipe/%d?raw HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50))
        mixed = b"GET /v1/agent/self HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /v1/kv/hostile/pipe/7?raw HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(writes + reads + mixed)
        for _ in range(50):
            assert read_response(sock)[2] == b"true"
        for i in range(50):
            assert read_response(sock)[2] == b"%d" % (i % 10)
        assert read_response(sock)[0] == 200
        assert read_response(sock)[2] == b"7"
    assert_serves(shared_edge)


def test_http2_and_stray_websocket_handshakes_are_answered_in_http11(shared_edge):
    upgrade = b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    with connect(shared_edge) as sock:
        # A WebSocket handshake to an HTTP route was a 500 and a traceback in the log.
        sock.sendall(b"GET /v1/kv/hostile/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + upgrade + b"\r\n")
        status, _, body = read_response(sock)
        assert status == 400 and json.loads(body)["error"] == "bad_request"
    with connect(shared_edge) as sock:
        # HTTP/2 would carry many requests past the per-connection bounds: not served.
        sock.sendall(
            b"GET /v1/kv/hostile/h2c HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        assert read_response(sock)[0] == 404
    with connect(shared_edge) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 4")
    assert "Exception on websocket" not in shared_edge.output
    assert_serves(shared_edge)

"""The KV fast path answers exactly as the routed request, and declines what it does not know.

Both go to the one KV handler (kv_routes.kv); the fast path only skips the
protocol core. Requests are written on raw sockets so that the bytes on the
wire are the test's own: a query parameter the fast path does not take
(``zz``, which the KV route ignores) sends the same request through hypercorn's
core and the ASGI app instead.
"""

from __future__ import annotations

import socket

import pytest

from konsul.protocols.http.kv_fast_path import MAX_BODY, Incomplete, KvFastPath


class RawClient:
    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(shared_edge):
    c = RawClient(shared_edge.addr)
    yield c
    c.close()


def request(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: test\r\n{extra}"
    if method == "PUT":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def ask(client: RawClient, method: str, target: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    client.send(request(method, target, body))
    status, headers, payload = client.response()
    headers.pop(b"date")
    return status, headers, payload


def with_zz(target: str) -> str:
    return target + ("&zz" if "?" in target else "?zz")


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("PUT", "/v1/kv/fast/a", b"value one"),
        ("GET", "/v1/kv/fast/a", b""),
        ("GET", "/v1/kv/fast/a?raw", b""),
        ("GET", "/v1/kv/fast/a?dc=global", b""),
        ("GET", "/v1/kv/fast/a?dc=&raw", b""),
        ("GET", "/v1/kv/fast/a?dc=global&dc=elsewhere", b""),
        ("GET", "/v1/kv/fast/missing", b""),
        ("PUT", "/v1/kv//leading-slash", b"v"),
        ("PUT", "/v1/kv/fast/a?dc=elsewhere", b"v"),
        ("PUT", "/v1/kv/" + "k" * 513, b"v"),
        ("GET", "/v1/kv/fast/?keys", b""),
        ("GET", "/v1/kv/fast/?recurse", b""),
        ("GET", "/v1/kv/fast/?keys&separator=/", b""),
        ("PUT", "/v1/kv/fast/a?flags=7&cas=0", b"v"),
        ("PUT", "/v1/kv/fast/a?flags=x", b"v"),
        ("DELETE", "/v1/kv/fast/a", b""),
        ("DELETE", "/v1/kv/fast/missing", b""),
    ],
)
def test_same_answer_as_the_route(client, method, target, body):
    client.send(request("PUT", "/v1/kv/fast/a", b"value one"))
    client.response()
    fast = ask(client, method, target, body)
    routed = ask(client, method, with_zz(target), body)
    assert fast == routed


@pytest.fixture(scope="module")
def acl_edge(tmp_path_factory):
    from agents import EdgeProcess

    process = EdgeProcess(tmp_path_factory.mktemp("fast-acl"), acl=True)
    yield process
    process.stop()


@pytest.mark.parametrize("token", ["", "X-Consul-Token: 00000000-0000-4000-8000-000000000000\r\n", "management"])
@pytest.mark.parametrize(("method", "target"), [("PUT", "/v1/kv/fast/b"), ("GET", "/v1/kv/fast/b")])
def test_same_refusal_or_answer_as_the_route_with_acls(acl_edge, method, target, token):
    from agents import MANAGEMENT_TOKEN

    if token == "management":
        token = f"Authorization: Bearer {MANAGEMENT_TOKEN}\r\n"
    client = RawClient(acl_edge.addr)
    try:
        answers = []
        for sent in (target, with_zz(target)):
            client.send(request(method, sent, b"v" if method == "PUT" else b"", extra=token))
            status, headers, payload = client.response()
            headers.pop(b"date")
            answers.append((status, headers, payload))
        assert answers[0] == answers[1]
        assert answers[0][0] == (200 if "Bearer" in token else 403)
    finally:
        client.close()


def test_keep_alive_header_as_python_requests_sends_it(client):
    extra = "Connection: keep-alive\r\nAccept: */*\r\nUser-Agent: python-requests/2.32\r\n"
    data = request("PUT", "/v1/kv/fast/ka", b"kept", extra)
    assert KvFastPath.parse(None, data) is not None
    client.send(data)
    assert client.response()[2] == b"true"
    for target in ("/v1/kv/fast/ka", "/v1/kv/fast/ka?raw"):
        client.send(request("GET", target, extra=extra))
        fast = client.response()
        client.send(request("GET", with_zz(target), extra=extra))
        routed = client.response()
        fast[1].pop(b"date"), routed[1].pop(b"date")
        assert fast == routed


def test_pipelined_requests_mixed_with_the_routes(client):
    client.send(
        request("PUT", "/v1/kv/fast/p1", b"one")
        + request("GET", "/v1/kv/fast/p1?raw&zz")  # through the core
        + request("PUT", "/v1/kv/fast/p2", b"two")
        + request("GET", "/v1/agent/self")
        + request("GET", "/v1/kv/fast/p2?raw")
    )
    answers = [client.response() for _ in range(5)]
    assert [a[0] for a in answers] == [200] * 5
    assert answers[0][2] == b"true" and answers[2][2] == b"true"
    assert answers[1][2] == b"one" and answers[4][2] == b"two"
    assert b"Config" in answers[3][2]


def test_request_split_into_single_bytes(client):
    data = request("PUT", "/v1/kv/fast/split", b"x" * 300)
    for i in range(len(data)):
        client.send(data[i:i + 1])
    assert client.response()[2] == b"true"
    assert ask(client, "GET", "/v1/kv/fast/split?raw")[2] == b"x" * 300


def test_large_value_and_too_large_body(client):
    value = b"v" * (MAX_BODY // 2)
    client.send(request("PUT", "/v1/kv/fast/big", value))
    assert client.response()[0] == 200
    assert ask(client, "GET", "/v1/kv/fast/big?raw")[2] == value


# parse() alone ---------------------------------------------------------------

def parse(data: bytes):
    return KvFastPath.parse(None, data)  # parse uses no state


def test_parse_plain_put_and_get():
    data = request("PUT", "/v1/kv/a/b?dc=x", b"hi")
    assert parse(data) == (b"PUT", b"a/b", b"dc=x", b"hi", len(data), None)
    data = request("GET", "/v1/kv/a")
    assert parse(data + b"more") == (b"GET", b"a", b"", b"", len(data), None)
    data = request("DELETE", "/v1/kv/a?recurse")
    assert parse(data) == (b"DELETE", b"a", b"recurse", b"", len(data), None)


def test_parse_finds_the_token_as_the_app_does():
    head = b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\n"
    assert parse(head + b"X-Consul-Token: s1\r\n\r\n")[5] == "s1"
    assert parse(head + b"Authorization: Bearer s2\r\n\r\n")[5] == "s2"
    assert parse(head + b"authorization: bearer  s2 \r\n\r\n")[5] == "s2"
    # X-Consul-Token first, as Consul and authz.token_from read them
    assert parse(head + b"Authorization: Bearer s2\r\nX-Consul-Token: s1\r\n\r\n")[5] == "s1"
    assert parse(head + b"Authorization: Basic abc\r\n\r\n")[5] is None
    # What the fast path does not judge goes to the app: two tokens, a non-ASCII one
    assert parse(head + b"X-Consul-Token: a\r\nX-Consul-Token: b\r\n\r\n") is None
    assert parse(head + b"X-Consul-Token: \xff\r\n\r\n") is None


@pytest.mark.parametrize(
    "data",
    [
        request("POST", "/v1/kv/a"),
        request("GET", "/v1/kv/"),
        request("GET", "/v1/kv/a?dc=a+b"),
        request("GET", "/v1/kv/a%2Fb"),
        request("GET", "/v1/kvx"),
        request("GET", "/v1/catalog/services"),
        b"GET /v1/kv/a HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /v1/kv/a HTTP/1.1\r\n\r\n",  # no Host
        b"GET /v1/kv/a HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n",
        b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nContent-Length: 1\r\n\r\nx",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"PUT /v1/kv/a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nbroken line\r\n\r\n",
    ],
)
def test_parse_declines(data):
    assert parse(data) is None


@pytest.mark.parametrize(
    "data",
    [b"PUT /v1/kv/a", b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\n", b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabc"],
)
def test_parse_waits_for_the_rest(data):
    with pytest.raises(Incomplete):
        parse(data)

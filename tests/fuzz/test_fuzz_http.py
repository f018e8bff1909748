"""The HTTP fast path: any bytes give a request, None or "need more"; answers are clean.

``KvFastPath.parse`` reads the head of every connection's buffer before
hypercorn does, so it sees every byte a client sends. The second test sends
requests the fast path takes to a running edge and checks the answers.
"""

from __future__ import annotations

import json
import socket

import pytest
from fuzz_strategies import budget, inputs
from fuzz_targets import TARGETS, http_fast_path
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.protocols.http.kv_fast_path import MAX_BODY
from konsul.sync.limits import MAX_VALUE_BYTES

SEEDS = TARGETS["http_fast_path"].seeds()


@budget(400)
@given(inputs(SEEDS, max_size=512))
@example(b"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n")
@example(b"GET /v1/kv/\xff HTTP/1.1\r\nHost: x\r\n\r\n")
def test_parse_takes_any_bytes(data):
    http_fast_path(data)


# Keys the fast path takes: printable ASCII without '%' (the rest goes through the core),
# and without '?', which starts the query.
_KEY_CHARS = st.sampled_from([chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%?"])
_QUERIES = st.sampled_from(["", "?dc=s1", "?dc=global", "?dc=elsewhere", "?dc=", "?raw", "?dc=s1&raw"])


class Connection:
    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers[b"content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split(b" ")[1]), body

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the edge closed the connection"
        self.buffer += data


def _request(method: str, target: str, body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if method == "PUT" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: fuzz\r\n{length}\r\n".encode() + body


@pytest.fixture(scope="module")
def connection(shared_edge):
    conn = Connection(shared_edge.addr)
    yield conn
    conn.sock.close()


@budget(60)
@given(
    method=st.sampled_from(["GET", "PUT"]),
    key=st.text(_KEY_CHARS, min_size=1, max_size=600),
    query=_QUERIES,
    body=st.binary(max_size=64),
)
@example(method="PUT", key="a/../b", query="", body=b"x")
@example(method="PUT", key="/lead", query="", body=b"x")
@example(method="GET", key="k" * 513, query="", body=b"")
def test_answers_are_clean(connection, method, key, query, body):
    target = f"/v1/kv/{key}{query}"
    status, answer = connection.exchange(_request(method, target, body if method == "PUT" else b""))
    assert status in (200, 400, 404), (status, answer[:200])
    if status == 400 or (status == 404 and answer):
        error = json.loads(answer)
        assert error["error"] and error["detail"], answer
    if method == "PUT" and status == 200 and query in ("", "?dc=s1"):
        assert answer == b"true"
        assert connection.exchange(_request("GET", f"/v1/kv/{key}?raw")) == (200, body or b"")
    assert connection.exchange(_request("GET", "/v1/status/leader"))[0] == 200


def test_body_over_the_limit_is_refused(connection):
    status, answer = connection.exchange(_request("PUT", "/v1/kv/fuzz/big", b"x" * (MAX_VALUE_BYTES + 1)))
    assert status == 413 and json.loads(answer)["error"]
    assert MAX_BODY > MAX_VALUE_BYTES

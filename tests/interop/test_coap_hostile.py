"""Hostile CoAP input against a real ``konsul edge``: nothing a peer sends may stop or wedge it.

Each test sends what an attacker on the LAN could (raw datagrams where aiocoap
would not build them), then checks that the edge is still up, answers a
normal request, and kept everything it had acknowledged. Raw datagrams are
built with aiocoap's encoder where they are well-formed and by hand where
they are not.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import httpx
import pytest
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON, NON, RST

sys.path.insert(0, str(Path(__file__).parent.parent))

from agents import EdgeProcess, eventually


def start_edge(tmp_path_factory, *extra: str) -> EdgeProcess:
    process = EdgeProcess(tmp_path_factory.mktemp("coap-hostile"), extra=["--coap-addr", "127.0.0.1:0", *extra])
    process.coap_host_port = process.coap_addr()
    host, port = process.coap_host_port
    process.coap = f"coap://{host}:{port}"
    return process


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    process = start_edge(tmp_path_factory, "--allow-anonymous")
    yield process
    process.stop()


class Peer:
    """A raw UDP socket talking CoAP to the edge."""

    def __init__(self, edge: EdgeProcess) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.target = edge.coap_host_port

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def receive(self, timeout: float = 5) -> Message:
        self.sock.settimeout(timeout)
        return Message.decode(self.sock.recvfrom(65536)[0])

    def request(self, data: bytes, timeout: float = 5) -> Message:
        self.send(data)
        return self.receive(timeout)

    def nothing_within(self, timeout: float) -> bool:
        """True if no datagram arrives within ``timeout`` (for "must not answer" checks only)."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recvfrom(65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def encode(code: Code, mid: int, token: bytes = b"", mtype=CON, payload: bytes = b"", **options) -> bytes:
    message = Message(code=code, payload=payload, **options)
    message.mid, message.token, message.mtype = mid, token, mtype
    return message.encode()


def still_serving(edge: EdgeProcess, key: str = "hostile/alive") -> None:
    """The edge is up: HTTP and CoAP both answer a normal request, and a write is durable."""
    assert edge.proc.poll() is None, edge.output
    reply = httpx.put(f"{edge.url}/v1/kv/{key}", content=b"yes")
    assert reply.status_code == 200 and reply.json() is True, reply.text
    peer = Peer(edge)
    try:
        answer = peer.request(encode(Code.GET, 4242, b"ok", uri_path=("kv", *key.split("/")), accept=0))
        assert (answer.code, answer.payload) == (Code.CONTENT, b"yes"), answer
    finally:
        peer.close()


def metric(edge: EdgeProcess, name: str) -> float:
    for line in httpx.get(f"{edge.url}/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run(coro_fn, *args):
    """``coro_fn(*args)`` on a plain selector loop of its own (see test_coap_aiocoap.run)."""
    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(*args), 30))
    finally:
        loop.close()


# -- finding 1: one datagram stopped the edge ---------------------------------------------


def test_uri_path_that_is_not_utf8_is_refused_not_fatal(edge):
    peer = Peer(edge)
    try:
        answer = peer.request(bytes.fromhex("400100 01 b1 ff".replace(" ", "")))
        assert (answer.mtype, answer.mid, answer.code) == (ACK, 1, Code.BAD_REQUEST), answer
        assert answer.payload.startswith(b"undecodable: ")
        # the same on a non-confirmable message: dropped, nothing to answer
        peer.send(bytes.fromhex("500100 02 b1 ff".replace(" ", "")))
    finally:
        peer.close()
    assert metric(edge, 'konsul_coap_refused_total{reason="undecodable"}') >= 1
    still_serving(edge)


def test_an_observer_that_went_away_ends_neither_the_edge_nor_other_observers(edge):
    """Observers in a row on one key, the earlier ones gone without deregistering, HTTP writes meanwhile.

    A notification to a closed port comes back as ICMP, which the kernel
    reports on the edge's next send -- to whichever observer is notified next
    in the same turn. That used to end that observation inside the send and
    crash the edge (aiocoap's pipe: 'bool' object is not iterable). Several
    earlier sessions make it all but certain one is notified before the last.
    """
    key = "hostile/observed"
    assert httpx.put(f"{edge.url}/v1/kv/{key}", content=b"v0").status_code == 200
    uri = f"{edge.coap}/kv/{key}"

    async def first_session():
        client = await Context.create_client_context()
        observed = client.request(Message(code=Code.GET, uri=uri, observe=0, accept=0))
        assert (await observed.response).payload == b"v0"
        await client.shutdown()  # the process of a device that quits: the socket closes, no deregistration

    for _ in range(5):
        run(first_session)

    async def second_session():
        client = await Context.create_client_context()
        try:
            observed = client.request(Message(code=Code.GET, uri=uri, observe=0, accept=0))
            assert (await observed.response).payload == b"v0"
            updates = observed.observation.__aiter__()
            loop = asyncio.get_running_loop()
            for n in range(1, 4):
                value = f"v{n}".encode()
                reply = await loop.run_in_executor(None, lambda v=value: httpx.put(f"{edge.url}/v1/kv/{key}", content=v))
                assert reply.status_code == 200
                while (notification := await asyncio.wait_for(updates.__anext__(), 10)).payload != value:
                    pass  # an earlier value's notification may still come first
                assert notification.code == Code.CONTENT
            observed.observation.cancel()
        finally:
            await client.shutdown()

    run(second_session)
    still_serving(edge)
    assert httpx.get(f"{edge.url}/v1/kv/{key}?raw").content == b"v3"

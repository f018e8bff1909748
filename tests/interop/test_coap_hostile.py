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
from aiocoap.numbers.types import ACK, CON, RST

sys.path.insert(0, str(Path(__file__).parent.parent))

from agents import EdgeProcess, eventually
from gateway_edges import coap_edge_anonymous, start_coap_edge  # noqa: F401 - the module's fixture edge


@pytest.fixture
def fresh_edge(tmp_path_factory):
    """An edge of its own, for tests that count what one source holds."""
    process = start_coap_edge(tmp_path_factory.mktemp("coap-hostile"), "--allow-anonymous")
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


def writer_query(edge: EdgeProcess, device_id: str = "hostile-writer") -> str:
    """``?ep=...&tk=...`` of a device that may write keys under ``hostile/`` (created once per edge)."""
    if not hasattr(edge, "writer_tokens"):
        edge.writer_tokens = {}
    if device_id not in edge.writer_tokens:
        reply = httpx.put(f"{edge.url}/v1/devices/{device_id}", json={"KVWrite": ["hostile/"]})
        assert reply.status_code == 201, reply.text
        edge.writer_tokens[device_id] = reply.json()["Token"]
    return f"ep={device_id}&tk={edge.writer_tokens[device_id]}"


def metric(edge: EdgeProcess, name: str) -> float:
    for line in httpx.get(f"{edge.url}/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(edge: EdgeProcess, name: str) -> float:
    """The sum of a metric over all its labels."""
    lines = httpx.get(f"{edge.url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


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


# -- finding 4: unbounded Observe registrations ---------------------------------------------


def observe_many(peer: Peer, key: str, count: int, first_mid: int, observe: int = 0) -> list[Message]:
    """``count`` Observe GETs (tokens 0, 1, ...) for ``key``; their answers, by token.

    Sent 16 at a time, as a client would (UDP drops what overflows the
    edge's receive buffer). An answer may come piggybacked or, when the edge
    is busy, as a separate confirmable response after an empty ACK
    (RFC 7252 5.2.2), which is acknowledged.
    """
    answers: dict[bytes, Message] = {}
    path = ("kv", *key.split("/"))
    for start in range(0, count, 16):
        window = range(start, min(count, start + 16))
        for n in window:
            peer.send(encode(Code.GET, first_mid + n, n.to_bytes(2, "big"), uri_path=path, observe=observe))
        while any(n.to_bytes(2, "big") not in answers for n in window):
            answer = peer.receive()
            if answer.mtype == CON:
                peer.send(encode(Code.EMPTY, answer.mid, mtype=ACK))
            if answer.code != Code.EMPTY:
                answers[answer.token] = answer
    return [answers[token] for token in sorted(answers)]


def test_observers_are_bounded_per_source_and_answered_as_plain_gets_past_the_bound(fresh_edge):
    edge = fresh_edge
    key = "hostile/popular"
    assert httpx.put(f"{edge.url}/v1/kv/{key}", content=b"v0").status_code == 200
    per_source = 256  # NetworkLimits.coap_observers_per_source
    refused_before = metric(edge, 'konsul_coap_refused_total{reason="observers_per_source"}')
    peer = Peer(edge)
    try:
        answers = observe_many(peer, key, per_source + 10, first_mid=1000)
        assert all(answer.code == Code.CONTENT for answer in answers)
        observing = [answer for answer in answers if answer.opt.observe is not None]
        assert len(observing) == per_source
        assert metric(edge, 'konsul_coap_refused_total{reason="observers_per_source"}') - refused_before == 10

        # another source still gets its observation
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        try:
            other.sendto(encode(Code.GET, 7, b"o", uri_path=("kv", *key.split("/")), observe=0), edge.coap_host_port)
            assert Message.decode(other.recvfrom(65536)[0]).opt.observe is not None
            other.sendto(encode(Code.GET, 8, b"o", uri_path=("kv", *key.split("/")), observe=1), edge.coap_host_port)
            assert Message.decode(other.recvfrom(65536)[0]).opt.observe is None
        finally:
            other.close()

        # deregistering (Observe: 1, RFC 7641 3.6) gives the places back
        answers = observe_many(peer, key, per_source + 10, first_mid=2000, observe=1)
        assert all(answer.opt.observe is None for answer in answers)
        eventually(lambda: metric(edge, "konsul_coap_observations") == 0, 10, "observations released")
        again = observe_many(peer, key, 1, first_mid=3000)
        assert again[0].opt.observe is not None
        observe_many(peer, key, 1, first_mid=3001, observe=1)
    finally:
        peer.close()
    still_serving(edge)


# -- finding 2 over CoAP: one rule set for structured payloads ----------------------------


def test_deeply_nested_documents_are_refused_and_change_nothing(edge):
    device = "deep-1"
    nested_json = b'{"a":' + b"[" * 900 + b"]" * 900 + b"}"
    nested_cbor = b"\xa1\x61a" + b"\x81" * 900 + b"\x80"  # {"a": [[[...[]...]]]}, 900 levels
    infinity_cbor = bytes.fromhex("a1 61 74 f9 7c00".replace(" ", ""))  # {"t": Infinity}
    query = writer_query(edge)

    async def scenario():
        client = await Context.create_client_context()
        try:
            base = f"{edge.coap}/devices/{device}"

            async def send(code, path, payload, fmt):
                message = Message(code=code, uri=f"{base}/{path}", payload=payload, content_format=fmt)
                return await client.request(message).response

            assert (await send(Code.PUT, "reported", b'{"fw":"1"}', 50)).code == Code.CHANGED
            answers = [
                await send(Code.PUT, "reported", nested_json, 50),
                await send(Code.POST, "reported", nested_cbor, 60),
                await send(Code.POST, "telemetry", nested_cbor, 60),
                await send(Code.POST, "telemetry", infinity_cbor, 60),
                await client.request(
                    Message(code=Code.PUT, uri=f"{edge.coap}/kv/hostile/deep?{query}", payload=nested_json, content_format=50)
                ).response,
            ]
            return answers
        finally:
            await client.shutdown()

    for answer in run(scenario):
        assert answer.code == Code.BAD_REQUEST, (answer, answer.payload[:100])
        assert answer.payload.startswith((b"bad_document: ", b"malformed_json: ")), answer.payload
    assert httpx.get(f"{edge.url}/v1/devices/{device}/reported").json() == {"fw": "1"}
    assert httpx.get(f"{edge.url}/v1/devices/{device}/telemetry").json() == []
    assert httpx.get(f"{edge.url}/v1/kv/hostile/deep").status_code == 404
    still_serving(edge)


# -- finding 7: block-wise details ---------------------------------------------------------


def test_block1_with_the_reserved_size_exponent_is_a_bad_request(edge):
    query = writer_query(edge)
    peer = Peer(edge)
    try:
        path = ("kv", "hostile", "block7")
        for mid, block in ((71, (0, True, 7)), (72, (0, False, 7))):
            answer = peer.request(
                encode(Code.PUT, mid, b"b7", uri_path=path, uri_query=tuple(query.split("&")), block1=block, payload=b"x" * 1024)
            )
            assert answer.code == Code.BAD_REQUEST and answer.payload.startswith(b"bad_block_option: "), answer
        answer = peer.request(encode(Code.GET, 73, b"b7", uri_path=path, block2=(0, False, 7)))
        assert answer.code == Code.BAD_REQUEST, answer
    finally:
        peer.close()
    assert httpx.get(f"{edge.url}/v1/kv/hostile/block7").status_code == 404
    still_serving(edge)


def test_observe_with_a_small_block2_gets_blocks_of_that_size_in_notifications_too(edge):
    key = "hostile/blocks"
    first, second = bytes(range(200)) + b"a" * 100, b"b" * 300
    assert httpx.put(f"{edge.url}/v1/kv/{key}", content=first).status_code == 200
    peer = Peer(edge)
    path = ("kv", *key.split("/"))
    try:
        answer = peer.request(encode(Code.GET, 81, b"bl", uri_path=path, observe=0, accept=42, block2=(0, False, 2)))
        assert answer.code == Code.CONTENT and answer.opt.observe is not None
        assert (len(answer.payload), answer.opt.block2) == (64, (0, True, 2)), answer.opt.block2
        assert answer.payload == first[:64]
        assert httpx.put(f"{edge.url}/v1/kv/{key}", content=second).status_code == 200
        notification = peer.receive()
        while notification.token != b"bl" or notification.code == Code.EMPTY:
            notification = peer.receive()
        if notification.mtype == CON:
            peer.send(encode(Code.EMPTY, notification.mid, mtype=ACK))
        assert (len(notification.payload), notification.opt.block2) == (64, (0, True, 2))
        assert notification.payload == second[:64]
        # the rest with plain GETs at that size (RFC 7959 3.4)
        rest = peer.request(encode(Code.GET, 82, b"b2", uri_path=path, accept=42, block2=(1, False, 2)))
        assert (rest.payload, rest.opt.block2) == (second[64:128], (1, True, 2))
        peer.request(encode(Code.GET, 83, b"bl", uri_path=path, observe=1, accept=42))  # deregister
    finally:
        peer.close()
    still_serving(edge)


# -- found while probing: datagrams larger than the read buffer -------------------------


def test_a_datagram_larger_than_the_read_buffer_is_refused_not_stored_cut_short(edge):
    """aiocoap reads 4096 bytes of a datagram and took the prefix for the whole message."""
    key = "hostile/truncated"
    peer = Peer(edge)
    try:
        query = tuple(writer_query(edge).split("&"))
        answer = peer.request(
            encode(Code.PUT, 91, b"tr", uri_path=("kv", *key.split("/")), uri_query=query, payload=b"x" * 5000, content_format=42)
        )
        assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE and answer.opt.size1 == 1024, answer
        assert answer.payload.startswith(b"truncated: ")
    finally:
        peer.close()
    assert httpx.get(f"{edge.url}/v1/kv/{key}").status_code == 404
    still_serving(edge)


# -- finding 4: other per-source state ------------------------------------------------------


def test_directory_registrations_are_bounded_per_source(fresh_edge):
    edge = fresh_edge
    per_source = 256  # NetworkLimits.coap_registrations_per_source
    peer = Peer(edge)
    try:
        locations = []
        for n in range(per_source + 1):
            query = ("ep=rd-flood", f"d=sector{n}")
            answer = peer.request(encode(Code.POST, 5000 + n, b"rd", uri_path=("rd",), uri_query=query))
            if n < per_source:
                assert answer.code == Code.CREATED, (n, answer, answer.payload)
                locations.append(answer.opt.location_path)
            else:
                assert answer.code == Code.SERVICE_UNAVAILABLE, answer
                assert answer.payload.startswith(b"too_many_registrations: ")
        # a registration that exists may still be refreshed, and removing one makes room
        again = peer.request(encode(Code.POST, 5400, b"rd", uri_path=("rd",), uri_query=("ep=rd-flood", "d=sector0")))
        assert again.code == Code.CREATED and again.opt.location_path == locations[0]
        gone = peer.request(encode(Code.DELETE, 5401, b"rd", uri_path=locations[1], uri_query=("ep=rd-flood",)))
        assert gone.code == Code.DELETED, (gone, gone.payload)
        room = peer.request(encode(Code.POST, 5402, b"rd", uri_path=("rd",), uri_query=("ep=rd-flood", "d=last")))
        assert room.code == Code.CREATED
        links = b"<" + b"a" * 5000 + b">"  # more links than a registration may hold, sent block-wise
        for n in range(5):
            block = links[n * 1024 : (n + 1) * 1024]
            answer = peer.request(
                encode(Code.POST, 5403 + n, b"rb", uri_path=("rd",), uri_query=("ep=rd-big",), payload=block,
                       content_format=40, block1=(n, n < 4, 6))
            )
        assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE, (answer, answer.payload[:200])
    finally:
        peer.close()
    assert metric(edge, 'konsul_coap_refused_total{reason="registrations_per_source"}') == 1
    still_serving(edge)


def test_block_wise_transfers_are_bounded_per_source(fresh_edge):
    edge = fresh_edge
    per_source = 32  # NetworkLimits.coap_transfers_per_source
    key = "hostile/large"
    value = b"L" * 4000  # four blocks: every GET of block 0 keeps the whole answer for the next ones
    assert httpx.put(f"{edge.url}/v1/kv/{key}", content=value).status_code == 200
    path = ("kv", *key.split("/"))
    peer = Peer(edge)
    try:
        for n in range(per_source):
            answer = peer.request(encode(Code.GET, 6000 + n, b"t", uri_path=path, uri_query=(f"v={n}",), accept=42))
            assert answer.code == Code.CONTENT and answer.opt.block2 is not None, answer
        refused = peer.request(encode(Code.GET, 6100, b"t", uri_path=path, uri_query=("v=more",), accept=42))
        assert refused.code == Code.SERVICE_UNAVAILABLE and refused.payload.startswith(b"too_many_transfers: ")
        upload = peer.request(
            encode(Code.PUT, 6101, b"u", uri_path=path, uri_query=tuple(writer_query(edge).split("&")), block1=(0, True, 6), payload=b"u" * 1024)
        )
        assert upload.code == Code.SERVICE_UNAVAILABLE, upload
        # a transfer under way goes on
        rest = peer.request(encode(Code.GET, 6102, b"t", uri_path=path, uri_query=("v=0",), accept=42, block2=(1, False, 6)))
        assert (rest.code, rest.payload) == (Code.CONTENT, value[1024:2048])
    finally:
        peer.close()
    # another address is not affected
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    other.settimeout(5)
    try:
        other.sendto(encode(Code.GET, 6200, b"o", uri_path=path, accept=42), edge.coap_host_port)
        assert Message.decode(other.recvfrom(65536)[0]).code == Code.CONTENT
    finally:
        other.close()
    assert metric(edge, 'konsul_coap_refused_total{reason="transfers_per_source"}') == 2
    still_serving(edge)


# -- found by fuzzing (docs/fuzzing.md, F7): a link that is no URL broke every lookup ---------


def test_a_registered_link_that_is_not_a_url_is_refused_and_lookups_keep_working(edge):
    """``<//[>`` passed aiocoap's link-format parser, was stored, and every /rd-lookup/res answered 5.00."""
    peer = Peer(edge)
    try:
        good = peer.request(encode(Code.POST, 0x701, b"l", uri_path=("rd",), uri_query=("ep=links-good",),
                                   payload=b'</t>;rt="link-probe"', content_format=40))
        assert good.code == Code.CREATED, (good, good.payload)
        for mid, links in enumerate([b"<//[>", b'</a>;anchor="//][",</b>', b"<coap://[::1/x>"], start=0x702):
            bad = peer.request(encode(Code.POST, mid, b"l", uri_path=("rd",), uri_query=("ep=links-bad",),
                                      payload=links, content_format=40))
            assert bad.code == Code.BAD_REQUEST and bad.payload.startswith(b"invalid_link: "), (links, bad, bad.payload)
        everything = peer.request(encode(Code.GET, 0x710, b"q", uri_path=("rd-lookup", "res")))
        assert everything.code == Code.CONTENT, (everything, everything.payload)
        probe = peer.request(encode(Code.GET, 0x711, b"q", uri_path=("rd-lookup", "res"), uri_query=("rt=link-probe",)))
        assert probe.code == Code.CONTENT and probe.payload.endswith(b'/t>;rt="link-probe";anchor="coap://127.0.0.1:%d"' % peer.sock.getsockname()[1]), probe.payload
        refused = peer.request(encode(Code.GET, 0x712, b"q", uri_path=("rd-lookup", "ep"), uri_query=("ep=links-bad",)))
        assert (refused.code, refused.payload) == (Code.CONTENT, b""), refused.payload  # nothing was registered
    finally:
        peer.close()
    # Not even the anonymous device the registration would have made.
    assert httpx.get(f"{edge.url}/v1/devices/links-bad", timeout=5).status_code == 404
    still_serving(edge)


# -- found while probing with malformed datagrams -----------------------------------------


def test_reserved_token_lengths_and_broken_options_are_format_errors(edge):
    peer = Peer(edge)
    try:
        for length in range(9, 16):  # RFC 7252 3: reserved, a message format error -> Reset
            answer = peer.request(bytes([0x40 | length, 0x01, 0x02, length]) + b"t" * length)
            assert (answer.mtype, answer.code, answer.mid) == (RST, Code.EMPTY, 0x200 + length), answer
        for mid, broken in enumerate([b"\xf0", b"\x0f", b"\xd0", b"\xe0\x01", b"\xbd\x05", b"\xb5ab"], start=0x300):
            peer.send(bytes([0x40, 0x01]) + mid.to_bytes(2, "big") + broken)  # aiocoap drops these
        for mid in (0x1234, 0x1235):  # an ACK and a Reset for exchanges that do not exist
            peer.send(bytes([0x60 if mid & 1 == 0 else 0x70, 0, *mid.to_bytes(2, "big")]))
    finally:
        peer.close()
    assert metric(edge, 'konsul_coap_refused_total{reason="bad_token_length"}') >= 7
    still_serving(edge)


def test_bad_blocks_and_parameters_are_4xx_not_5xx(edge):
    query = tuple(writer_query(edge).split("&"))
    path = ("kv", "hostile", "blocks-bad")
    peer = Peer(edge)
    try:
        short = peer.request(encode(Code.PUT, 0x401, b"s", uri_path=path, uri_query=query, block1=(0, True, 6), payload=b"a" * 10))
        assert short.code == Code.BAD_REQUEST and short.payload.startswith(b"bad_block: "), short
        first = peer.request(encode(Code.PUT, 0x402, b"s", uri_path=path, uri_query=query, block1=(0, True, 2), payload=b"a" * 64))
        assert first.code == Code.CONTINUE
        gap = peer.request(encode(Code.PUT, 0x403, b"s", uri_path=path, uri_query=query, block1=(15, False, 5), payload=b"b" * 64))
        assert gap.code == Code.REQUEST_ENTITY_INCOMPLETE and gap.payload.startswith(b"incomplete: "), gap
        base = peer.request(encode(Code.POST, 0x404, b"r", uri_path=("rd",), uri_query=("ep=probe", "base=coap://[::1")))
        assert base.code == Code.BAD_REQUEST, (base, base.payload)
        page = peer.request(encode(Code.GET, 0x405, b"p", uri_path=("rd-lookup", "ep"), uri_query=("page=-1", "count=2")))
        assert page.code == Code.BAD_REQUEST, page
    finally:
        peer.close()
    assert httpx.get(f"{edge.url}/v1/kv/hostile/blocks-bad").status_code == 404
    still_serving(edge)


def test_mutated_datagrams_never_get_a_5xx_or_stop_the_edge(edge):
    """A short, deterministic mutation run over well-formed requests (bench/fuzz.py runs longer)."""
    import random

    rng = random.Random(14)
    seeds = [
        encode(Code.GET, 1, b"ab", uri_path=("kv", "hostile", "alive"), accept=42),
        encode(Code.GET, 1, b"ab", uri_path=("kv", "hostile", "alive"), observe=0, block2=(0, False, 2)),
        encode(Code.PUT, 1, b"ab", uri_path=("kv", "hostile", "m"), uri_query=("ep=d1",), payload=b'{"a":1}', content_format=50),
        encode(Code.POST, 1, b"ab", uri_path=("devices", "d1", "reported"), payload=b"\xa1\x61a\x01"),
        encode(Code.POST, 1, b"ab", uri_path=("rd",), uri_query=("ep=d1", "lt=100"), payload=b'</s>;rt="t"', content_format=40),
        encode(Code.PUT, 1, b"ab", uri_path=("kv", "y"), block1=(0, True, 2), payload=b"a" * 64),
    ]
    peer = Peer(edge)
    server_errors = []
    try:
        for round_ in range(25):
            sent = []
            for n in range(16):
                datagram = bytearray(rng.choice(seeds))
                datagram[2:4] = (round_ * 16 + n).to_bytes(2, "big")
                for _ in range(rng.randint(1, 3)):
                    where = rng.randrange(len(datagram))
                    if rng.random() < 0.5 and where >= 4:
                        datagram[where] = rng.randrange(256)
                    elif rng.random() < 0.5:
                        datagram.insert(where, rng.randrange(256))
                    else:
                        del datagram[max(where, 4) :]
                sent.append(bytes(datagram))
                peer.send(bytes(datagram))
            peer.sock.settimeout(0.1)
            while True:  # the answers, until the edge has nothing more to say
                try:
                    answer = Message.decode(peer.sock.recvfrom(65536)[0])
                except TimeoutError:
                    break
                if answer.code.is_response() and answer.code.class_ == 5:
                    server_errors.append((answer, answer.payload))
    finally:
        peer.close()
    assert not server_errors, server_errors
    assert metric_sum(edge, "konsul_asyncio_callback_errors_total") == 0
    still_serving(edge)


def test_a_silent_observer_gets_one_queued_notification_per_observation_not_one_per_write(fresh_edge):
    """Confirmable notifications to a peer that acknowledges nothing used to queue without bound.

    aiocoap sends one confirmable message per peer at a time and queued the
    rest: 200 silent observations and 300 writes held 110 MB. Now a newer
    notification replaces the queued one of its observation; once the peer
    acknowledges, it gets each observation's newest value and little else.
    """
    edge = fresh_edge
    key, observers, writes = "hostile/silent", 8, 30
    assert httpx.put(f"{edge.url}/v1/kv/{key}", content=b"v0").status_code == 200
    peer = Peer(edge)
    try:
        observe_many(peer, key, observers, first_mid=100)
        with httpx.Client() as http:
            for n in range(1, writes + 1):
                assert http.put(f"{edge.url}/v1/kv/{key}", content=b"v%d" % n).status_code == 200
        newest: dict[bytes, bytes] = {}
        received = 0
        while not all(newest.get(n.to_bytes(2, "big")) == b"v%d" % writes for n in range(observers)):
            notification = peer.receive(timeout=10)  # acknowledged: the next queued one follows
            if notification.mtype == CON:
                peer.send(encode(Code.EMPTY, notification.mid, mtype=ACK))
            if notification.code == Code.CONTENT and notification.opt.observe is not None:
                received += 1
                newest[notification.token] = cbor_or_raw(notification.payload)
        assert received <= 3 * observers, received  # without coalescing: up to observers x writes
        observe_many(peer, key, observers, first_mid=300, observe=1)
    finally:
        peer.close()
    still_serving(edge)


def cbor_or_raw(payload: bytes) -> bytes:
    """A KV value as the default format (CBOR byte string) carries it."""
    import cbor2

    try:
        value = cbor2.loads(payload)
    except Exception:  # noqa: BLE001 - not CBOR: the payload is the value
        return payload
    return value if isinstance(value, bytes) else payload

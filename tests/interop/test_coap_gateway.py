"""The CoAP gateway in-process, under trio-asyncio as the agent runs it.

What needs the agent's side of the gateway: the telemetry and reported hooks
(a trio one and a plain one), desired state served from the agent and
notified through ``push.notify_desired``, Observe fed by writes made in
trio, a clean shutdown, and a clear error when the port is taken.
"""

from __future__ import annotations

from functools import partial

import socket

import cbor2
import pytest
import trio
import trio.lowlevel
import trio_asyncio
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import CON
from konsul.protocols.coap import run_coap_gateway
from konsul.protocols.gateway import DeviceHooks, GatewayContext
from konsul.protocols.coap.kv import make_etag
from konsul.sync.devices import DeviceRecord, PresenceTable
from konsul.sync.replica import Replica


class Harness:
    """A replica, a gateway on a free port, and an aiocoap client, all in one trio-asyncio loop."""

    def __init__(self, gateways: GatewayContext, uri: str, client: Context) -> None:
        self.gateways, self.uri, self.client = gateways, uri, client
        self.addr = uri.removeprefix("coap://")  # host:port, as the gateway was given it
        host, port = self.addr.rsplit(":", 1)
        self.host_port = (host, int(port))

    async def request(self, code: Code, path: str, payload: bytes = b"", **options) -> Message:
        message = Message(code=code, uri=self.uri + path, payload=payload, **options)
        return await trio_asyncio.aio_as_trio(lambda: self.client.request(message).response)()

    async def observe(self, path: str, **options):
        """The first response and a function that awaits the next notification."""
        message = Message(code=Code.GET, uri=self.uri + path, observe=0, **options)

        async def start():  # on the asyncio side: aiocoap binds its futures to the running loop
            observed = self.client.request(message)
            return observed, await observed.response, observed.observation.__aiter__()

        # aiocoap ends an observation whose request object is collected: keep it
        self.observed, first, updates = await trio_asyncio.aio_as_trio(start)()

        async def next_notification() -> Message:
            with trio.fail_after(10):
                return await trio_asyncio.aio_as_trio(updates.__anext__)()

        return first, next_notification


async def gateway_harness(tmp_path, hooks: DeviceHooks, body, **context) -> None:
    replica = Replica.open(tmp_path / "data")
    try:
        async with trio.open_nursery() as outer:
            await outer.start(replica.run)
            gateways = GatewayContext(replica, "s1", PresenceTable(), hooks=hooks, **context)
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                # these tests authenticate with tk= (--coap-uri-tokens on)
                addr = await nursery.start(partial(run_coap_gateway, uri_tokens=True), gateways, "127.0.0.1:0")
                client = await trio_asyncio.aio_as_trio(Context.create_client_context)()
                try:
                    await body(Harness(gateways, f"coap://{addr}", client))
                finally:
                    await trio_asyncio.aio_as_trio(client.shutdown)()
                    nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        replica.close()


async def test_documents_reach_the_hooks(tmp_path):
    received = []

    async def on_telemetry(device_id, document):
        await trio.lowlevel.checkpoint()  # a trio hook: it may write to the store
        received.append(("telemetry", device_id, document))

    hooks = DeviceHooks(on_telemetry=on_telemetry, on_reported=lambda d, doc: received.append(("reported", d, doc)))

    async def body(h: Harness):
        sent = await h.request(Code.POST, "/devices/pump-1/telemetry", cbor2.dumps({"rpm": 1200}))
        assert sent.code == Code.CHANGED
        sent = await h.request(Code.POST, "/devices/pump-1/reported", b'{"fw": "2.0"}', content_format=50)
        assert sent.code == Code.CHANGED
        bad = await h.request(Code.POST, "/devices/pump-1/telemetry", b"\xff\xff")
        assert bad.code == Code.BAD_REQUEST

    await gateway_harness(tmp_path, hooks, body, allow_anonymous=True)
    assert received == [("telemetry", "pump-1", {"rpm": 1200}), ("reported", "pump-1", {"fw": "2.0"})]


async def test_desired_state_is_served_and_notified(tmp_path):
    desired = {"pump-1": {"speed": 1}}
    hooks = DeviceHooks(desired_state=lambda device_id: desired.get(device_id, {}))

    async def body(h: Harness):
        first, next_notification = await h.observe("/devices/pump-1/desired")
        assert cbor2.loads(first.payload) == {"speed": 1} and first.opt.content_format == 60
        desired["pump-1"] = {"speed": 2}
        h.gateways.push.notify_desired("pump-1")
        assert cbor2.loads((await next_notification()).payload) == {"speed": 2}

    pushes = []

    async def body_then_keep(h: Harness):
        await body(h)
        pushes.append(h.gateways.push)

    await gateway_harness(tmp_path, hooks, body_then_keep, allow_anonymous=True)
    assert pushes[0].notify_desired is None  # removed again on shutdown


async def test_observe_sees_writes_made_in_trio(tmp_path):
    async def body(h: Harness):
        scope = h.gateways.scope
        await scope.kv_put("cfg/mode", b"eco")
        first, next_notification = await h.observe("/kv/cfg/mode", accept=0)
        assert first.payload == b"eco"
        await scope.kv_put("cfg/mode", b"boost")
        assert (await next_notification()).payload == b"boost"
        await h.gateways.global_scope.kv_put("cfg/mode", b"fleet")  # another scope: no notification
        await scope.kv_put("cfg/mode", b"off")
        assert (await next_notification()).payload == b"off"

    await gateway_harness(tmp_path, DeviceHooks(), body, allow_anonymous=True)


async def test_a_taken_port_is_a_clear_error(tmp_path):
    async def body(h: Harness):
        with pytest.raises(OSError, match="cannot listen for CoAP on"):
            await run_coap_gateway(h.gateways, h.addr)

    await gateway_harness(tmp_path, DeviceHooks(), body, allow_anonymous=True)


async def _writer_device(h: Harness) -> str:
    """A device allowed to write under ``k/``; returns its URI query."""
    _record, token = await h.gateways.scope.put_device(DeviceRecord("w1", kv_write=("k/",)), new_token=True)
    return f"?ep=w1&tk={token}"


async def test_concurrent_puts_share_commits_and_are_durable_when_answered(tmp_path):
    async def body(h: Harness):
        query = await _writer_device(h)
        store = h.gateways.scope.store
        rounds_before = store.rounds
        # 40 endpoints with one PUT each, all in flight at once (an aiocoap
        # client would send them one at a time: NSTART=1)
        targets = [(f"k/{i}", query) for i in range(40)] + [("k/g", query + "&dc=global")]
        plain = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in targets]
        socks = [trio.socket.from_stdlib_socket(sock) for sock in plain]
        try:
            for sock in plain:
                sock.connect(h.host_port)
            for sock, (key, q) in zip(plain, targets, strict=True):  # no checkpoint in between
                sock.send(_put(key, q, cbor2.dumps(key.encode()), mid=7))
            codes = []
            with trio.fail_after(10):
                for sock in socks:
                    codes.append(await _response_code(sock))
        finally:
            for sock in socks:
                sock.close()
        assert codes == [0x41] * 41  # 2.01 Created
        # every answer came after its write was durable, and the writes shared commits
        assert store.rounds - rounds_before < 10
        assert h.gateways.scope.kv.get("k/39").value == b"k/39"
        assert h.gateways.global_scope.kv.get("k/g").value == b"k/g"
        assert store.query("SELECT count(*) FROM updates")[0][0] > 0
        again = await h.request(Code.PUT, f"/kv/k/0{query}", cbor2.dumps(b"w"))
        assert again.code == Code.CHANGED
        assert again.opt.etag == make_etag(h.gateways.scope.kv.get("k/0").modify_index, 60)

    await gateway_harness(tmp_path, DeviceHooks(), body)


async def test_a_retransmitted_request_gets_the_same_answer_and_is_applied_once(tmp_path):
    async def body(h: Harness):
        query = await _writer_device(h)
        datagram = _put("k/x", query, cbor2.dumps(b"one"), mid=0x1234)
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.connect(h.host_port)
            await sock.send(datagram)
            with trio.fail_after(5):
                first = await sock.recv(2048)
                # A busy server may first acknowledge with an empty ACK and answer separately.
                while first[1] == 0:
                    first = await sock.recv(2048)
            assert first[1] == 0x41  # 2.01 Created
            index = h.gateways.scope.kv.get("k/x").modify_index
            await sock.send(datagram)
            with trio.fail_after(5):
                again = await sock.recv(2048)
            # The same answer again (or, after a separate response, the same empty ACK), never a new write.
            assert again == first or (again[1] == 0 and again[2:4] == b"\x12\x34")
            assert h.gateways.scope.kv.get("k/x").modify_index == index
            # a new message id is a new request
            await sock.send(datagram[:2] + b"\x12\x35" + datagram[4:])
            with trio.fail_after(5):
                assert (await sock.recv(2048))[1] == 0x44  # 2.04 Changed
            assert h.gateways.scope.kv.get("k/x").modify_index > index

    await gateway_harness(tmp_path, DeviceHooks(), body)


async def _response_code(sock: trio.socket.SocketType) -> int:
    """The code of the response to the one confirmable request sent on ``sock``.

    Piggybacked on the ACK, or, when the answer is not ready within aiocoap's
    EMPTY_ACK_DELAY (0.1 s: a commit on a loaded machine takes longer), a
    separate response after an empty ACK (RFC 7252 5.2.2). A confirmable
    separate response is acknowledged, as a client must, so the server does
    not send it again.
    """
    while True:
        datagram = await sock.recv(2048)
        mtype, code = (datagram[0] >> 4) & 0x3, datagram[1]
        if code == 0:  # the empty ACK: the answer follows in a message of its own
            continue
        if mtype == 0:  # CON
            await sock.send(bytes([0x60, 0]) + datagram[2:4])  # an empty ACK with its message ID
        return code


def _put(key: str, query: str, payload: bytes, mid: int) -> bytes:
    """A confirmable PUT of ``/kv/<key>?<query>`` with a one-byte token, as one datagram."""
    message = Message(
        code=Code.PUT, _mtype=CON, _mid=mid, _token=b"\xaa", uri_path=("kv", *key.split("/")),
        uri_query=tuple(query.lstrip("?").split("&")), payload=payload,
    )
    return message.encode()

"""The CoAP gateway in-process, under trio-asyncio as the agent runs it.

What needs the agent's side of the gateway: the telemetry and reported hooks
(a trio one and a plain one), desired state served from the agent and
notified through ``extras["notify_desired"]``, Observe fed by writes made in
trio, a clean shutdown, and a clear error when the port is taken.
"""

from __future__ import annotations

import cbor2
import pytest
import trio
import trio.lowlevel
import trio_asyncio
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from konsul.protocols.coap import run_coap_gateway
from konsul.protocols.gateway import GatewayContext
from konsul.sync.devices import PresenceTable
from konsul.sync.replica import Replica


class Harness:
    """A replica, a gateway on a free port, and an aiocoap client, all in one trio-asyncio loop."""

    def __init__(self, gateways: GatewayContext, uri: str, client: Context) -> None:
        self.gateways, self.uri, self.client = gateways, uri, client

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


async def gateway_harness(tmp_path, extras, body, **context) -> None:
    replica = Replica.open(tmp_path / "data")
    try:
        async with trio.open_nursery() as outer:
            await outer.start(replica.run)
            gateways = GatewayContext(replica, "s1", PresenceTable(), extras=extras, **context)
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                addr = await nursery.start(run_coap_gateway, gateways, "127.0.0.1:0")
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

    extras = {"on_telemetry": on_telemetry, "on_reported": lambda d, doc: received.append(("reported", d, doc))}

    async def body(h: Harness):
        sent = await h.request(Code.POST, "/devices/pump-1/telemetry", cbor2.dumps({"rpm": 1200}))
        assert sent.code == Code.CHANGED
        sent = await h.request(Code.POST, "/devices/pump-1/reported", b'{"fw": "2.0"}', content_format=50)
        assert sent.code == Code.CHANGED
        bad = await h.request(Code.POST, "/devices/pump-1/telemetry", b"\xff\xff")
        assert bad.code == Code.BAD_REQUEST

    await gateway_harness(tmp_path, extras, body, allow_anonymous=True)
    assert received == [("telemetry", "pump-1", {"rpm": 1200}), ("reported", "pump-1", {"fw": "2.0"})]


async def test_desired_state_is_served_and_notified(tmp_path):
    desired = {"pump-1": {"speed": 1}}
    extras = {"desired_state": lambda device_id: desired.get(device_id, {})}

    async def body(h: Harness):
        first, next_notification = await h.observe("/devices/pump-1/desired")
        assert cbor2.loads(first.payload) == {"speed": 1} and first.opt.content_format == 60
        desired["pump-1"] = {"speed": 2}
        h.gateways.extras["notify_desired"]("pump-1")
        assert cbor2.loads((await next_notification()).payload) == {"speed": 2}

    await gateway_harness(tmp_path, extras, body, allow_anonymous=True)
    assert "notify_desired" not in extras  # removed again on shutdown


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

    await gateway_harness(tmp_path, {}, body, allow_anonymous=True)


async def test_a_taken_port_is_a_clear_error(tmp_path):
    async def body(h: Harness):
        with pytest.raises(OSError, match="cannot listen for CoAP on"):
            await run_coap_gateway(h.gateways, h.uri.removeprefix("coap://"))

    await gateway_harness(tmp_path, {}, body, allow_anonymous=True)

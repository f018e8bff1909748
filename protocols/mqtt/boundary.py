"""Where trio and asyncio meet for MQTT: the only module that crosses (DESIGN.md, 2).

The agent runs on trio; amqtt runs on asyncio, on the one loop the agent opens
with ``trio_asyncio.open_loop()``. Both run on the same thread, so there are
two kinds of calls between them:

- coroutines cross with the adapters: trio -> asyncio (``aio_as_trio``) to
  create, start and stop the broker and to store retained messages;
  asyncio -> trio (``trio_as_aio``) to admit a device (which may register an
  anonymous device, a durable write);
- plain synchronous calls go straight through, both ways: the broker side
  telling the gateway about connections and messages, the gateway writing
  frames for devices (deliveries, PUBACKs) and waking paused readers. They
  neither block nor await, and asyncio's transports and events only schedule
  callbacks on the running loop, which is this thread's. This is measured, not
  taken for granted: a crossing costs a task and a loop round trip, about a
  millisecond on the machine in docs/benchmarks.md, and made every KV
  acknowledgement that much later.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_asyncio
from trio_asyncio import aio_as_trio, trio_as_aio

from konsul.protocols.aio_guard import contain_callback_errors
from konsul.protocols.aio_loop import run_callbacks_in_batches

from konsul.protocols.gateway import GatewayContext

from .broker import EmbeddedBroker, Listener
from .core import MqttGateway, Outgoing

log = logging.getLogger("konsul.mqtt")
STOP_TIMEOUT = 10.0


class AgentPort:
    """The gateway as the asyncio side sees it."""

    def __init__(self, gateway: MqttGateway, max_payload: int) -> None:
        self.max_payload = max_payload
        self.limits = gateway.ctx.limits
        self.refusals = gateway.refusals
        self.records = gateway.records
        self.admit = trio_as_aio(gateway.admit)
        self.connected = gateway.connected
        self.disconnected = gateway.disconnected
        self.may_subscribe = gateway.may_subscribe
        self.may_receive = gateway.may_receive
        self.retained_kv = gateway.retained_kv
        self.received = gateway.received
        self.congested = gateway.congested


class EmbeddedOutlet:
    """The gateway's way out to devices, through the embedded broker."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker

    async def send(self, messages: list[Outgoing]) -> None:
        if all(message.kind == "kv" for message in messages):
            self.broker.deliver(messages)  # writes to sockets only: no crossing
        else:
            await aio_as_trio(self.broker.send)(messages)  # amqtt's retained store is async

    async def settle(self, results: list[tuple[Any, bool]]) -> None:
        self.broker.settle(results)

    async def kick(self, device_id: str, keep_token_hash: str | None = None, why: str = "device deleted") -> None:
        self.broker.kick(device_id, keep_token_hash, why)


async def _create_broker(port: AgentPort) -> EmbeddedBroker:
    # amqtt binds itself to the running asyncio loop when constructed.
    return EmbeddedBroker(port)


async def run_embedded(
    gateways: GatewayContext, listeners: list[Listener], *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the embedded broker on ``listeners`` until cancelled; reports the ``host:port`` each is bound to."""
    quiet_amqtt()
    run_callbacks_in_batches(trio_asyncio.current_loop.get())
    contain_callback_errors(trio_asyncio.current_loop.get(), gateways.registry)  # amqtt's callbacks too
    gateway = MqttGateway(gateways)
    broker = await aio_as_trio(_create_broker)(AgentPort(gateway, gateways.max_payload))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run, EmbeddedOutlet(broker))
            bound = await aio_as_trio(broker.start)(listeners)
            gateway.install_push()
            task_status.started(bound)
    finally:
        gateway.remove_push()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + STOP_TIMEOUT
            await aio_as_trio(broker.stop)()
        if scope.cancelled_caught:
            log.warning("the broker did not stop within %ss", STOP_TIMEOUT)


def quiet_amqtt() -> None:
    """amqtt logs every connection (and transitions every state change) at INFO."""
    if not logging.getLogger("konsul").isEnabledFor(logging.DEBUG):
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)

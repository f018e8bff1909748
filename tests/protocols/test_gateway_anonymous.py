"""Anonymous devices are bounded and expire (GatewayContext.anonymous), on a real replica.

The cap and the expiry are days or thousands in production; here they are
small limits and a clock the test sets, and the sweep is called directly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio

from konsul.protocols.admission import NetworkLimits
from konsul.protocols.gateway import ANONYMOUS_TYPE, AnonymousDevices, AnonymousDevicesFull, GatewayContext
from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.core import MqttGateway
from konsul.sync.devices import DeviceRecord, PresenceTable
from konsul.sync.replica import Replica

EXPIRY = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ctx(tmp_path):
    replica = Replica.open(tmp_path / "data")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            limits = replace(NetworkLimits(), anonymous_devices=3, anonymous_device_expiry_s=EXPIRY)
            context = GatewayContext(replica=replica, site="s1", presence=PresenceTable(), allow_anonymous=True, limits=limits)
            context.clock = Clock()
            context.anonymous = AnonymousDevices(context, clock=context.clock)
            yield context
            nursery.cancel_scope.cancel()
    finally:
        replica.close()


async def test_new_anonymous_devices_past_the_cap_are_refused(ctx):
    await ctx.scope.put_device(DeviceRecord("with-token", type="sensor"))  # not counted
    for device_id in ("a1", "a2", "a3"):
        assert (await ctx.authenticate(device_id, None)).type == ANONYMOUS_TYPE
    assert (await ctx.authenticate("a2", None)).device_id == "a2"  # known: admitted, not counted again
    with pytest.raises(AnonymousDevicesFull):
        await ctx.authenticate("a4", None)
    assert ctx.scope.devices.get("a4") is None  # nothing written
    assert ctx.anonymous.refused._value.get() == 1
    # A place freed elsewhere (an operator's DELETE) is seen at the next count.
    await ctx.scope.delete_device("a1")
    with pytest.raises(AnonymousDevicesFull):
        await ctx.authenticate("a4", None)  # counted moments ago: not counted again on every refusal
    ctx.clock.now += 10
    assert (await ctx.authenticate("a4", None)).device_id == "a4"


async def test_the_mqtt_gateway_answers_the_cap_with_server_unavailable(ctx):
    gateway = MqttGateway(ctx)
    for n in range(3):
        assert await gateway.admit(_connect(f"m{n}"), "10.0.0.9:1000") == codec.ACCEPTED
    assert await gateway.admit(_connect("m3"), "10.0.0.9:1001") == codec.SERVER_UNAVAILABLE
    assert gateway.metrics.refused.labels("anonymous")._value.get() == 1


async def test_anonymous_devices_unseen_past_the_expiry_are_deleted(ctx):
    clock, presence = ctx.clock, ctx.presence
    ctx.limits.anonymous_devices = 4
    await ctx.scope.put_device(DeviceRecord("registered", type="sensor"))
    for device_id in ("stored-before-start", "connected", "coap-recent", "coap-old"):
        await ctx.authenticate(device_id, None)
    presence.seen("connected", "mqtt")  # an MQTT connection held: online, however long ago it began
    presence.seen("coap-recent", "coap")
    presence.seen("coap-old", "coap")
    presence.devices["connected"].last_seen = clock.now - 10 * EXPIRY
    presence.devices["coap-old"].last_seen = clock.now - 10 * EXPIRY  # CoAP "online" is only "seen lately"
    presence.devices["coap-recent"].last_seen = clock.now + EXPIRY
    # Within the expiry of the start, nothing goes: the start counts as everyone's last contact.
    assert await ctx.anonymous.sweep(clock.now + EXPIRY - 1) == []
    deleted = await ctx.anonymous.sweep(clock.now + EXPIRY + 1)
    assert sorted(deleted) == ["coap-old", "stored-before-start"]
    assert ctx.scope.devices.get("stored-before-start") is None and ctx.scope.devices.get("coap-old") is None
    assert ctx.scope.devices.get("registered") is not None  # only anonymous records expire
    assert ctx.scope.devices.get("connected") is not None and ctx.scope.devices.get("coap-recent") is not None
    assert "coap-old" not in presence.devices  # the presence table forgets it too
    assert ctx.anonymous.expired._value.get() == 2
    assert ctx.anonymous.known == 2
    # The places are free again.
    assert (await ctx.authenticate("newcomer", None)).type == ANONYMOUS_TYPE


def _connect(client_id: str) -> codec.Connect:
    return codec.Connect(4, True, 30, client_id)


async def test_one_new_device_connecting_twice_at_once_is_registered_once(ctx):
    found = []

    async def connect() -> None:
        found.append(await ctx.authenticate("twice", None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect)
        nursery.start_soon(connect)
    assert [record.device_id for record in found] == ["twice", "twice"]
    assert ctx.anonymous.registered._value.get() == 1 and ctx.anonymous.known == 1

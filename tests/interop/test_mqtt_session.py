"""The MQTT gateway in-process (real replica, real sockets) with real clients.

These need the agent's side of the API that has no HTTP route yet: the
``publish_desired`` function a gateway installs in ``GatewayContext.push``,
and the telemetry and reported hooks of ``GatewayContext.hooks``.
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import trio
from agents import AgentProcess
from agents import eventually as wait_until
from gateway_edges import start_mqtt_edge
from konsul.protocols.gateway import GatewayContext
from konsul.protocols.mqtt import codec, run_mqtt_gateway
from konsul.sync.devices import DeviceRecord, PresenceTable
from konsul.sync.replica import Replica
from test_mqtt_embedded import Device, mosquitto_sub, register, stop_spawned  # noqa: F401 (fixture)


@pytest.fixture
async def gateway(tmp_path):
    replica = Replica.open(tmp_path / "data")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            ctx = GatewayContext(replica=replica, site="s1", presence=PresenceTable())
            async with trio.open_nursery() as gateways:  # no asyncio loop: the broker is on trio
                addr = (await gateways.start(run_mqtt_gateway, ctx, "127.0.0.1:0"))["mqtt"]
                ctx.port = int(addr.rsplit(":", 1)[1])
                yield ctx
                gateways.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        replica.close()


async def device(ctx: GatewayContext, device_id: str, **fields) -> str:
    _record, token = await ctx.scope.put_device(DeviceRecord(device_id, **fields))
    return token


def sub(ctx: GatewayContext, *args: str) -> AgentProcess:
    """A running mosquitto_sub (stopped after the test by ``stop_spawned``)."""
    return mosquitto_sub(ctx.port, *args)


async def wait_for(process: AgentProcess, pattern: str) -> None:
    await trio.to_thread.run_sync(process.wait_for, pattern)


async def eventually(check, what: str) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.05)  # polling interval under a deadline


async def test_persistent_session_gets_the_desired_updates_queued_while_away(gateway):
    token = await device(gateway, "pers-1")
    publish_desired = gateway.push.publish_desired
    topic = "konsul/v1/devices/pers-1/desired"
    # -c: clean session off, so the broker keeps the subscription and queues QoS 1 messages.
    args = ["-c", "-q", "1", "-i", "pers-1", "-u", "pers-1", "-P", token, "-t", topic]
    publish_desired("pers-1", {"speed": 1})
    first = sub(gateway, *args)
    await wait_for(first, rf'{topic} {{"speed":1}}')  # retained: it is subscribed now
    first.stop(signal.SIGINT)  # a clean DISCONNECT; the session stays
    await eventually(lambda: not gateway.presence.get("pers-1").online, "pers-1 offline")
    publish_desired("pers-1", {"speed": 2})
    publish_desired("pers-1", {"speed": 3})
    again = sub(gateway, *args)
    try:
        await wait_for(again, rf'{topic} {{"speed":3}}')
        got = [line.split(" ", 1)[1].strip() for line in again.lines if line.startswith(topic)]
        assert got[:2] == ['{"speed":2}', '{"speed":3}'], again.output
    finally:
        again.stop()


async def test_desired_is_retained_for_late_subscribers_and_cleared_by_none(gateway):
    token = await device(gateway, "late-1")
    gateway.push.publish_desired("late-1", {"mode": "eco"})
    topic = "konsul/v1/devices/late-1/desired"
    watcher = sub(gateway, "-i", "late-1", "-u", "late-1", "-P", token, "-t", topic)
    try:
        await wait_for(watcher, rf'{topic} {{"mode":"eco"}}')  # retained, though published before
        gateway.push.publish_desired("late-1", None)
        await wait_for(watcher, rf"{topic} ?(\(null\))?$")  # the clearing reaches watchers as empty
    finally:
        watcher.stop()
    late = sub(gateway, "-i", "late-1", "-u", "late-1", "-P", token, "-t", topic, "-W", "1")
    try:
        await trio.to_thread.run_sync(late.proc.wait, 10)
        assert "mode" not in late.output  # and nothing is retained any more
    finally:
        late.stop()


async def test_telemetry_and_reported_reach_the_hooks(gateway):
    token = await device(gateway, "hook-1")
    samples: list[tuple[str, dict]] = []
    reported: list[tuple[str, dict]] = []

    async def on_telemetry(device_id: str, sample: dict) -> None:
        await trio.sleep(0)  # hooks may be async
        samples.append((device_id, sample))

    gateway.hooks.on_telemetry = on_telemetry
    gateway.hooks.on_reported = lambda device_id, state: reported.append((device_id, state))
    base = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gateway.port), "-i", "hook-1", "-u", "hook-1", "-P", token, "-q", "1"]
    await trio.run_process([*base, "-t", "konsul/v1/devices/hook-1/telemetry", "-m", '{"t": 20}'])
    await trio.run_process([*base, "-t", "konsul/v1/devices/hook-1/reported", "-m", json.dumps({"fw": "1.2"})])
    await eventually(lambda: samples and reported, "both hooks")
    assert samples == [("hook-1", {"t": 20})] and reported == [("hook-1", {"fw": "1.2"})]


async def test_anonymous_devices_are_registered_when_allowed(gateway):
    base = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gateway.port), "-i", "anon-1",
            "-t", "konsul/v1/devices/anon-1/telemetry", "-m", "{}"]
    refused = await trio.run_process(base, check=False, capture_stderr=True)
    assert refused.returncode != 0 and gateway.scope.devices.get("anon-1") is None
    gateway.allow_anonymous = True
    await trio.run_process(base)
    record = gateway.scope.devices.get("anon-1")
    assert record is not None and record.type == "anonymous" and record.kv_write == ()


async def test_deleting_a_device_closes_its_connection_and_ends_its_session(gateway):
    token = await device(gateway, "gone-1")
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", gateway.port))
    await sock.send(codec.encode_connect("gone-1", username="gone-1", password=token, clean_session=False))
    assert await sock.recv(4) == b"\x20\x02\x00\x00"
    await eventually(lambda: gateway.presence.get("gone-1").online, "online")
    await gateway.scope.delete_device("gone-1")
    with trio.fail_after(10):
        while await sock.recv(4096):
            pass
    sock.close()
    await eventually(lambda: not gateway.presence.get("gone-1").online, "offline")
    # Registered again under the same id, it starts without the old session.
    token = await device(gateway, "gone-1")
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", gateway.port))
    await sock.send(codec.encode_connect("gone-1", username="gone-1", password=token, clean_session=False))
    assert await sock.recv(4) == b"\x20\x02\x00\x00"  # session present: 0
    sock.close()


def test_frames_round_trip():
    """The sans-IO codec alone: what the agent sends, it reads back."""
    splitter = codec.FrameSplitter(max_body=1000)
    wire = codec.encode_connect("d1", keepalive=7, clean_session=False, username="d1", password="t") + codec.encode_publish(
        "a/b", b"x" * 200, qos=1, retain=True, packet_id=9
    )
    for i in range(0, len(wire), 3):  # arriving in small pieces
        splitter.feed(wire[i : i + 3])
    connect = codec.decode_connect(splitter.next_frame())
    assert (connect.client_id, connect.keepalive, connect.clean_session, connect.password) == ("d1", 7, False, b"t")
    publish = codec.decode(splitter.next_frame())
    assert (publish.topic, publish.qos, publish.retain, publish.packet_id, len(publish.payload)) == ("a/b", 1, True, 9, 200)
    assert splitter.next_frame() is None and splitter.buffered == 0
    splitter.feed(codec.encode_publish("a/b", b"y" * 1001, qos=1, packet_id=1))
    with pytest.raises(codec.ProtocolViolation) as refused:
        splitter.next_frame()
    assert refused.value.reason == "too_large"


def test_messages_queued_for_an_away_session_survive_a_restart(tmp_path):
    """A persistent session away while the edge restarts gets, once back, what was queued for it before."""
    data = tmp_path / "edge"
    edge = start_mqtt_edge(data)
    try:
        # The session store is opened only once a persistent session needs it.
        assert not (data / "mqtt-sessions.db").exists()
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            token = register(http, "keep-1")
            device = Device(edge.mqtt_port, "keep-1", token, clean=False)
            assert device.connected() == 0
            assert device.subscribe("konsul/v1/kv/keep/#") == [1]
            device.close()
            wait_until(lambda: http.get("/v1/devices/keep-1").json()["Online"] is False, what="keep-1 away")
            assert http.put("/v1/kv/keep/a", content=b"before the restart").json() is True
    finally:
        assert edge.stop() == 0
    edge = start_mqtt_edge(data)
    try:
        device = Device(edge.mqtt_port, "keep-1", token, clean=False)
        assert device.connected() == 0
        assert device.message("konsul/v1/kv/keep/a").payload == b"before the restart"
        device.close()
    finally:
        edge.stop()

"""Devices as principals (docs/acl.md): shorthands, policies, rotation, rates, audit, on a real edge.

The edge runs with ACLs on and an initial management token; policies and
tokens are made over ``/v1/acl``. Devices talk MQTT (paho) and CoAP (aiocoap).
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import MANAGEMENT_TOKEN, EdgeProcess, eventually  # noqa: E402
from test_coap_aiocoap import request  # noqa: E402
from test_coap_aiocoap import run as coap  # noqa: E402

MANAGEMENT = MANAGEMENT_TOKEN
KV = "konsul/v1/kv/"
DEVICES = "konsul/v1/devices/"


class DeviceAclEdge(EdgeProcess):
    """`konsul edge` with ACLs on, MQTT and CoAP, and an initial management token."""

    def __init__(self, data_dir: Path, extra: list[str] | None = None) -> None:
        super().__init__(
            data_dir, acl=True, extra=["--mqtt-addr", "127.0.0.1:0", "--coap-addr", "127.0.0.1:0", *(extra or [])]
        )
        self.mqtt_host, self.mqtt_port = self.mqtt_addr()
        host, port = self.coap_addr()
        self.coap = f"coap://{host}:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10, headers={"X-Consul-Token": MANAGEMENT})

    def stop(self, *args, **kwargs) -> int:
        self.http.close()
        return super().stop(*args, **kwargs)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    process = DeviceAclEdge(tmp_path_factory.mktemp("device-acl"))
    yield process
    process.stop()


# -- helpers -------------------------------------------------------------------------------


def register(edge: DeviceAclEdge, device_id: str, **fields) -> str:
    reply = edge.http.put(f"/v1/devices/{device_id}", json={"Type": "sensor", **fields})
    assert reply.status_code == 201, reply.text
    return reply.json()["Token"]


def policy(edge: DeviceAclEdge, name: str, rules: str) -> str:
    reply = edge.http.put("/v1/acl/policy", json={"Name": name, "Rules": rules})
    assert reply.status_code == 200, reply.text
    return reply.json()["ID"]


def token_with(edge: DeviceAclEdge, *policy_names: str) -> str:
    reply = edge.http.put("/v1/acl/token", json={"Policies": [{"Name": n} for n in policy_names]})
    assert reply.status_code == 200, reply.text
    return reply.json()["SecretID"]


def kv_value(edge: DeviceAclEdge, key: str) -> bytes | None:
    reply = edge.http.get(f"/v1/kv/{key}?raw")
    return reply.content if reply.status_code == 200 else None


def metric(edge: DeviceAclEdge, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in edge.http.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def audit_events(edge: DeviceAclEdge) -> list[dict]:
    path = edge.data_dir / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Device:
    """A paho MQTT client of one device; QoS 1 publishes wait for their PUBACK."""

    def __init__(self, edge: DeviceAclEdge, device_id: str, token: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(device_id, token)
        self.connects: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p=None: self.connects.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p=None: self.disconnects.put(rc)
        self.client.connect(edge.mqtt_host, edge.mqtt_port, keepalive=30)
        self.client.loop_start()

    def connected(self) -> bool:
        rc = self.connects.get(timeout=10)
        return not rc.is_failure

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        if qos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def still_serving(edge: DeviceAclEdge) -> None:
    assert edge.http.put("/v1/kv/alive", content=b"yes").json() is True
    assert kv_value(edge, "alive") == b"yes"


# -- tests -----------------------------------------------------------------------------------


def test_kvwrite_shorthand_allows_its_prefix_only_over_mqtt_and_coap(edge):
    token = register(edge, "short-1", KVWrite=["app/"], KVRead=[])
    device = Device(edge, "short-1", token)
    try:
        assert device.connected()
        refused_before = metric(edge, "konsul_mqtt_refused_total", reason="forbidden")
        device.publish(KV + "other/x", b"no")  # acknowledged (MQTT 3.1.1 cannot refuse one PUBLISH), dropped
        device.publish(KV + "app/x", b"yes")
        assert eventually(lambda: kv_value(edge, "app/x") == b"yes", 10)
        assert kv_value(edge, "other/x") is None
        assert metric(edge, "konsul_mqtt_refused_total", reason="forbidden") == refused_before + 1
    finally:
        device.close()

    async def scenario(client):
        allowed = await request(client, Code.PUT, f"{edge.coap}/kv/app/y?ep=short-1&tk={token}", b"1", content_format=0)
        refused = await request(client, Code.PUT, f"{edge.coap}/kv/other/y?ep=short-1&tk={token}", b"1", content_format=0)
        unread = await request(client, Code.GET, f"{edge.coap}/kv/alive?ep=short-1&tk={token}")
        return allowed, refused, unread

    allowed, refused, unread = coap(scenario)
    assert allowed.code == Code.CREATED
    assert refused.code == Code.FORBIDDEN and b"KVWrite" in refused.payload
    assert unread.code == Code.FORBIDDEN  # KVRead [] and no policy: nothing to read
    assert kv_value(edge, "app/y") == b"1" and kv_value(edge, "other/y") is None
    # Audited: the writes allowed and the refusals, with the device as accessor and never its token.
    events = eventually(
        lambda: [e for e in audit_events(edge) if e["accessor"] == "short-1"] if any(
            e["accessor"] == "short-1" and e["interface"] == "coap" and e["result"] == "denied" for e in audit_events(edge)
        ) else None, 10, "audit events of short-1",
    )
    seen = {(e["interface"], e["operation"], e["resource"], e["result"]) for e in events}
    assert ("mqtt", "kv:write", "app/x", "allowed") in seen
    assert ("mqtt", "publish", KV + "other/x", "denied") in seen
    assert ("coap", "kv:write", "app/y", "allowed") in seen
    assert ("coap", "kv:write", "other/y", "denied") in seen
    assert token not in (edge.data_dir / "audit.log").read_text()
    still_serving(edge)


def test_a_glob_policy_grants_matching_keys_and_a_change_applies_on_the_next_message(edge):
    policy(edge, "sensors-cfg", 'key_prefix "sensors/*/cfg" { policy = "write" }')
    token = register(edge, "glob-1", KVRead=[], Policies=[{"Name": "sensors-cfg"}])
    shown = edge.http.get("/v1/devices/glob-1").json()
    assert [link["Name"] for link in shown["Policies"]] == ["sensors-cfg"]
    device = Device(edge, "glob-1", token)
    try:
        assert device.connected()
        device.publish(KV + "sensors/a/other", b"no")
        device.publish(KV + "sensors/a/b/cfg", b"no")  # '*' is one segment
        device.publish(KV + "sensors/a/cfg", b"yes")
        assert eventually(lambda: kv_value(edge, "sensors/a/cfg") == b"yes", 10)
        assert kv_value(edge, "sensors/a/other") is None and kv_value(edge, "sensors/a/b/cfg") is None

        async def scenario(client):
            return await request(client, Code.PUT, f"{edge.coap}/kv/sensors/b/cfg?ep=glob-1&tk={token}", b"c", content_format=0)

        assert coap(scenario).code == Code.CREATED
        # Unlinking the policy takes effect on the next message, on the same connection.
        unlinked = edge.http.put("/v1/devices/glob-1", json={"Policies": []})
        assert unlinked.status_code == 200 and unlinked.json()["Policies"] == []
        device.publish(KV + "sensors/c/cfg", b"late")
        device.publish(KV + "sensors/a/cfg", b"late")  # refused too: a marker that the first was handled
        assert device.disconnects.empty()
        assert eventually(lambda: metric(edge, "konsul_mqtt_refused_total", reason="forbidden") >= 4, 10)
        assert kv_value(edge, "sensors/c/cfg") is None and kv_value(edge, "sensors/a/cfg") == b"yes"
    finally:
        device.close()
    # An unknown policy cannot be linked.
    unknown = edge.http.put("/v1/devices/glob-2", json={"Policies": [{"Name": "no-such-policy"}]})
    assert unknown.status_code == 400 and "no-such-policy" in unknown.json()["detail"]


def test_a_device_writes_another_devices_twin_only_with_a_policy(edge):
    register(edge, "twin-b")
    token_a = register(edge, "twin-a")
    device = Device(edge, "twin-a", token_a)
    try:
        assert device.connected()
        device.publish(DEVICES + "twin-b/reported", b'{"by": "a"}')
        device.publish(DEVICES + "twin-a/reported", b'{"own": true}')  # its own: always allowed
        assert eventually(lambda: edge.http.get("/v1/devices/twin-a/reported").json() == {"own": True}, 10)
        assert edge.http.get("/v1/devices/twin-b/reported").json() == {}

        async def refused(client):
            return await request(client, Code.POST, f"{edge.coap}/devices/twin-b/reported?ep=twin-a&tk={token_a}",
                                 b'{"by": "coap"}', content_format=50)

        answer = coap(refused)
        assert answer.code == Code.FORBIDDEN and b"device:write" in answer.payload

        policy(edge, "writes-twin-b", 'device "twin-b" { policy = "write" }')
        assert edge.http.put("/v1/devices/twin-a", json={"Policies": [{"Name": "writes-twin-b"}]}).status_code == 200
        device.publish(DEVICES + "twin-b/reported", b'{"by": "a"}')
        assert eventually(lambda: edge.http.get("/v1/devices/twin-b/reported").json() == {"by": "a"}, 10)
        assert coap(refused).code == Code.CHANGED
        assert edge.http.get("/v1/devices/twin-b/reported").json() == {"by": "coap"}
    finally:
        device.close()


def test_rotating_a_token_ends_mqtt_sessions_and_coap_observations_of_the_old_one(edge):
    old = register(edge, "rot-1", KVWrite=["rot/"])
    edge.http.put("/v1/kv/rot/watched", content=b"first")
    device = Device(edge, "rot-1", old)

    async def observe_then_rotate(client):
        observed = client.request(Message(code=Code.GET, uri=f"{edge.coap}/kv/rot/watched?ep=rot-1&tk={old}", observe=0))
        first = await observed.response
        assert first.code == Code.CONTENT and first.opt.observe is not None
        updates = observed.observation.__aiter__()
        rotated = await asyncio.to_thread(edge.http.put, "/v1/devices/rot-1?rotate-token", json={})
        try:
            last = await updates.__anext__()
        except StopAsyncIteration:
            last = None  # ended before the iterator waited
        return rotated, last

    try:
        assert device.connected()
        device.publish(KV + "rot/a", b"1")
        rotated, last = coap(observe_then_rotate)
        assert rotated.status_code == 200
        new = rotated.json()["Token"]
        assert new != old
        assert last is None or last.code == Code.UNAUTHORIZED, last
        device.disconnects.get(timeout=10)  # the edge closed the session made with the old token
    finally:
        device.client.loop_stop()
    again = Device(edge, "rot-1", old)
    try:
        assert not again.connected()  # the old token is refused
    finally:
        again.close()
    fresh = Device(edge, "rot-1", new)
    try:
        assert fresh.connected()
        fresh.publish(KV + "rot/b", b"2")
        assert eventually(lambda: kv_value(edge, "rot/b") == b"2", 10)
    finally:
        fresh.close()
    # Deleting the device ends its session too.
    gone = Device(edge, "rot-1", new)
    try:
        assert gone.connected()
        assert edge.http.delete("/v1/devices/rot-1").json() is True
        gone.disconnects.get(timeout=10)
    finally:
        gone.client.loop_stop()
    still_serving(edge)


def test_device_routes_need_device_rights_and_grants_need_the_callers_own(edge):
    policy(edge, "ops-devices", 'device_prefix "ops-" { policy = "write" }\nkey_prefix "ops/" { policy = "write" }')
    ops = token_with(edge, "ops-devices")
    register(edge, "other-1")
    as_ops = {"X-Consul-Token": ops}
    anonymous = httpx.put(f"{edge.url}/v1/devices/ops-x", json={"KVRead": []})
    assert anonymous.status_code == 403 and anonymous.json()["error"] == "permission_denied"
    # A new device reads all KV by default: a token without key:read on everything must say otherwise.
    default_read = httpx.put(f"{edge.url}/v1/devices/ops-1", json={}, headers=as_ops)
    assert default_read.status_code == 403 and "KVRead" in default_read.json()["detail"]
    created = httpx.put(f"{edge.url}/v1/devices/ops-1", json={"KVRead": [], "KVWrite": ["ops/"]}, headers=as_ops)
    assert created.status_code == 201, created.text
    too_much = httpx.put(f"{edge.url}/v1/devices/ops-1", json={"KVWrite": [""]}, headers=as_ops)
    assert too_much.status_code == 403 and "key:write" in too_much.json()["detail"]
    link = httpx.put(f"{edge.url}/v1/devices/ops-1", json={"Policies": [{"Name": "ops-devices"}]}, headers=as_ops)
    assert link.status_code == 403 and "acl:write" in link.json()["detail"]
    foreign = httpx.put(f"{edge.url}/v1/devices/other-1?rotate-token", json={}, headers=as_ops)
    assert foreign.status_code == 403 and "device:write" in foreign.json()["detail"]
    assert httpx.get(f"{edge.url}/v1/devices/other-1/twin", headers=as_ops).status_code == 403
    assert httpx.get(f"{edge.url}/v1/devices/other-1/telemetry", headers=as_ops).status_code == 403
    listed = {d["ID"] for d in httpx.get(f"{edge.url}/v1/devices", headers=as_ops).json()}
    assert "ops-1" in listed and "other-1" not in listed  # filtered, not refused
    assert httpx.put(f"{edge.url}/v1/devices/ops-1/desired", json={"on": True}, headers=as_ops).status_code == 200
    assert httpx.delete(f"{edge.url}/v1/devices/ops-1", headers=as_ops).json() is True
    still_serving(edge)


@pytest.fixture(scope="module")
def slow_edge(tmp_path_factory):
    process = DeviceAclEdge(tmp_path_factory.mktemp("device-rate"),
                            ["--device-message-rate", "1", "--device-message-burst", "10"])
    yield process
    process.stop()


def test_a_flood_past_the_device_rate_is_dropped_or_answered_4_29_and_recovers(slow_edge):
    edge = slow_edge
    token = register(edge, "flood-1", KVWrite=["flood/"])
    device = Device(edge, "flood-1", token)
    try:
        assert device.connected()
        for n in range(30):
            device.publish(KV + f"flood/{n}", b"x")  # QoS 1: every one acknowledged, the excess not applied
        assert metric(edge, "konsul_rate_limited_total", interface="mqtt", kind="device") >= 15
        assert metric(edge, "konsul_mqtt_refused_total", reason="rate_limited") >= 15
        stored = [n for n in range(30) if kv_value(edge, f"flood/{n}") is not None]
        assert 10 <= len(stored) < 30
        assert device.disconnects.empty()  # dropped, not cut off

        def recovered() -> bool:
            device.publish(KV + "flood/later", b"ok")
            return kv_value(edge, "flood/later") == b"ok"

        assert eventually(recovered, 15, "the bucket to refill")
    finally:
        device.close()

    async def scenario(client):
        answers = [await request(client, Code.GET, f"{edge.coap}/kv/flood/0?ep=flood-1&tk={token}") for _ in range(15)]
        limited = [a for a in answers if a.code == Code.TOO_MANY_REQUESTS]
        assert limited, [a.code for a in answers]
        assert limited[0].opt.max_age >= 1 and b"rate_limited" in limited[0].payload
        deadline = time.monotonic() + 15
        while True:  # recovers once the bucket refills (polling, bounded)
            answer = await request(client, Code.GET, f"{edge.coap}/kv/flood/0?ep=flood-1&tk={token}")
            if answer.code == Code.CONTENT:
                return
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.2)

    coap(scenario)
    assert metric(edge, "konsul_rate_limited_total", interface="coap", kind="device") >= 1
    assert eventually(lambda: any(e["result"] == "rate_limited" and e["accessor"] == "flood-1" for e in audit_events(edge)), 10)
    still_serving(edge)


def test_with_acl_off_devices_behave_as_before(tmp_path):
    edge = EdgeProcess(tmp_path / "edge", extra=["--acl", "off", "--coap-addr", "127.0.0.1:0"])
    try:
        host, port = edge.coap_addr()
        created = httpx.put(f"{edge.url}/v1/devices/off-1", json={"KVWrite": ["app/"]})  # no token needed
        assert created.status_code == 201
        token = created.json()["Token"]

        async def scenario(client):
            base = f"coap://{host}:{port}"
            own = await request(client, Code.PUT, f"{base}/kv/app/x?ep=off-1&tk={token}", b"1", content_format=0)
            other = await request(client, Code.PUT, f"{base}/kv/other/x?ep=off-1&tk={token}", b"1", content_format=0)
            contradiction = await request(client, Code.POST, f"{base}/devices/off-2/telemetry?ep=off-1&tk={token}", b"")
            return own, other, contradiction

        own, other, contradiction = coap(scenario)
        assert own.code == Code.CREATED and other.code == Code.FORBIDDEN
        assert contradiction.code == Code.BAD_REQUEST  # ep contradicts the path, as before ACLs
    finally:
        edge.stop()


def test_the_devices_command_links_policies_by_name(edge):
    import os
    import subprocess

    policy(edge, "cli-pumps", 'device_prefix "cli-pump-" { policy = "write" }')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KONSUL_")}
    environ.update(KONSUL_HTTP_ADDR=edge.addr, KONSUL_HTTP_TOKEN=MANAGEMENT)

    def konsul(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "konsul.cli", *args], capture_output=True, env=environ, timeout=60)

    created = konsul("devices", "create", "cli-gw", "--kv-read", "", "--policy-name", "cli-pumps", "--format", "json")
    assert created.returncode == 0, created.stderr
    assert [link["Name"] for link in json.loads(created.stdout)["Policies"]] == ["cli-pumps"]
    shown = konsul("devices", "show", "cli-gw")
    assert shown.returncode == 0 and "cli-pumps" in shown.stdout.decode()
    unknown = konsul("devices", "create", "cli-gw", "--policy-name", "nope")
    assert unknown.returncode == 1 and b"nope" in unknown.stderr
    cleared = konsul("devices", "create", "cli-gw", "--no-policies", "--format", "json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["Policies"] == []

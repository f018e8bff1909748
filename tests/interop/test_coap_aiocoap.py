"""aiocoap as the device, against real ``konsul edge`` processes.

The core cases again with a second implementation (registration with its
Location-Path, KV in every format, Observe, 100 KiB both ways and observed),
plus what coap-client cannot easily show: registration update and lapse,
conditional writes, authentication with tokens, the device resources.
Each test runs the asyncio client in ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import cbor2
import httpx
import pytest
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).parent.parent))

from agents import EdgeProcess


def start_edge(tmp_path_factory, *extra: str) -> EdgeProcess:
    process = EdgeProcess(tmp_path_factory.mktemp("coap-edge"), extra=["--acl", "off", "--coap-addr", "127.0.0.1:0", *extra])
    host, port = process.coap_addr()
    process.coap = f"coap://{host}:{port}"
    return process


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    process = start_edge(tmp_path_factory, "--allow-anonymous")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def closed_edge(tmp_path_factory):
    """An edge without --allow-anonymous: every device needs its token."""
    process = start_edge(tmp_path_factory)
    yield process
    process.stop()


def new_device(edge, device_id: str, **body) -> str:
    reply = httpx.put(f"{edge.url}/v1/devices/{device_id}", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()["Token"]


def run(coro_fn, *args):
    """Run ``coro_fn(client, *args)`` with a fresh aiocoap client context.

    On a plain selector loop of its own: once anything in the test process has
    imported trio_asyncio, ``asyncio.run`` would use trio-asyncio's loop.
    """

    async def main():
        client = await Context.create_client_context()
        try:
            return await asyncio.wait_for(coro_fn(client, *args), 30)
        finally:
            await client.shutdown()

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def request(client: Context, code: Code, uri: str, payload: bytes = b"", **options) -> Message:
    return await client.request(Message(code=code, uri=uri, payload=payload, **options)).response


def wait_until(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return found


def test_register_update_and_remove(edge):
    async def scenario(client):
        created = await request(
            client, Code.POST, f"{edge.coap}/rd?ep=node-1&lt=120", b'</light>;rt="light"', content_format=40
        )
        assert created.code == Code.CREATED
        location = "/" + "/".join(created.opt.location_path)
        again = await request(client, Code.POST, f"{edge.coap}/rd?ep=node-1&lt=120", b"", content_format=40)
        assert "/" + "/".join(again.opt.location_path) == location  # re-registration keeps its place
        updated = await request(client, Code.POST, f"{edge.coap}{location}?lt=600")
        assert updated.code == Code.CHANGED
        listed = await request(client, Code.GET, f"{edge.coap}/rd-lookup/ep?ep=node-1")
        assert f"<{location}>" in listed.payload.decode() and 'lt="600"' in listed.payload.decode()
        removed = await request(client, Code.DELETE, f"{edge.coap}{location}")
        assert removed.code == Code.DELETED
        gone = await request(client, Code.POST, f"{edge.coap}{location}")
        assert gone.code == Code.NOT_FOUND and gone.payload.startswith(b"not_found: ")

    run(scenario)


def test_registration_lapses_and_marks_the_device_offline(edge):
    async def register(client):
        created = await request(client, Code.POST, f"{edge.coap}/rd?ep=node-2&lt=600")
        assert created.code == Code.CREATED
        return "/" + "/".join(created.opt.location_path)

    async def shorten(client, location):
        assert (await request(client, Code.POST, f"{edge.coap}{location}?lt=1")).code == Code.CHANGED

    location = run(register)
    assert httpx.get(f"{edge.url}/v1/devices/node-2").json()["Online"] is True
    run(shorten, location)  # the update restarts the timer with the new lifetime
    wait_until(lambda: httpx.get(f"{edge.url}/v1/devices/node-2").json()["Online"] is False)
    listed = run(lambda client: request(client, Code.GET, f"{edge.coap}/rd-lookup/ep?ep=node-2"))
    assert listed.payload == b""


def test_kv_in_every_format(edge):
    token = new_device(edge, "fmt", KVWrite=["fmt/"])
    auth = f"ep=fmt&tk={token}"

    async def scenario(client):
        uri = f"{edge.coap}/kv/fmt/doc?{auth}"
        put = await request(client, Code.PUT, uri, b'{"interval": 30}', content_format=50)
        assert put.code == Code.CREATED
        as_json = await request(client, Code.GET, uri, accept=50)
        assert as_json.opt.content_format == 50 and json.loads(as_json.payload) == {"interval": 30}
        as_text = await request(client, Code.GET, uri, accept=0)
        assert as_text.opt.content_format == 0 and as_text.payload == b'{"interval": 30}'
        as_cbor = await request(client, Code.GET, uri)
        assert as_cbor.opt.content_format == 60 and cbor2.loads(as_cbor.payload) == b'{"interval": 30}'
        put = await request(client, Code.PUT, uri, cbor2.dumps("text in CBOR"), content_format=60)
        assert put.code == Code.CHANGED
        raw = await request(client, Code.GET, uri, accept=42)
        assert raw.opt.content_format == 42 and raw.payload == b"text in CBOR"
        not_json = await request(client, Code.GET, uri, accept=50)
        assert not_json.code == Code.NOT_ACCEPTABLE and not_json.payload.startswith(b"not_acceptable: ")
        deleted = await request(client, Code.DELETE, uri)
        assert deleted.code == Code.DELETED
        assert (await request(client, Code.GET, uri)).code == Code.NOT_FOUND

    run(scenario)


def test_conditional_writes_and_etags(edge):
    token = new_device(edge, "cas", KVWrite=["cas/"])
    uri = f"{edge.coap}/kv/cas/k?ep=cas&tk={token}"

    async def scenario(client):
        first = await request(client, Code.PUT, uri, b"1", content_format=0, if_none_match=True)
        assert first.code == Code.CREATED
        again = await request(client, Code.PUT, uri, b"2", content_format=0, if_none_match=True)
        assert again.code == Code.PRECONDITION_FAILED
        current = await request(client, Code.GET, uri, accept=0)
        valid = await request(client, Code.GET, uri, accept=0, etags=[current.opt.etag])
        assert valid.code == Code.VALID and valid.payload == b""
        stale = current.opt.etag
        ok = await request(client, Code.PUT, uri, b"3", content_format=0, if_match=[stale])
        assert ok.code == Code.CHANGED
        lost = await request(client, Code.PUT, uri, b"4", content_format=0, if_match=[stale])
        assert lost.code == Code.PRECONDITION_FAILED

    run(scenario)
    assert httpx.get(f"{edge.url}/v1/kv/cas/k?raw").content == b"3"


def test_observe_follows_http_changes_and_deletion(edge):
    httpx.put(f"{edge.url}/v1/kv/obs/a", content=b"first")

    async def scenario(client):
        observed = client.request(Message(code=Code.GET, uri=f"{edge.coap}/kv/obs/a", observe=0, accept=0))
        assert (await observed.response).payload == b"first"
        updates = observed.observation.__aiter__()
        await asyncio.to_thread(httpx.put, f"{edge.url}/v1/kv/obs/a", content=b"second")
        assert (await updates.__anext__()).payload == b"second"
        await asyncio.to_thread(httpx.delete, f"{edge.url}/v1/kv/obs/a")
        # The 4.04 notification (without Observe) ends the observation. aiocoap
        # either ends the iteration at once or, when the notification lands
        # before the iterator waits, hands it over as the last item.
        try:
            last = await updates.__anext__()
        except StopAsyncIteration:
            return
        assert (last.code, last.opt.observe) == (Code.NOT_FOUND, None), last
        with pytest.raises(StopAsyncIteration):
            await updates.__anext__()

    run(scenario)


def test_100k_values_both_ways_and_observed(edge):
    token = new_device(edge, "bulk", KVWrite=["bulk/"])
    uri = f"{edge.coap}/kv/bulk/image?ep=bulk&tk={token}"
    up, later = os.urandom(100 * 1024), os.urandom(100 * 1024)

    async def scenario(client):
        put = await request(client, Code.PUT, uri, up, content_format=42)
        assert put.code == Code.CREATED, put.payload
        got = await request(client, Code.GET, uri, accept=42)
        assert got.payload == up
        observed = client.request(Message(code=Code.GET, uri=uri, observe=0, accept=42))
        assert (await observed.response).payload == up
        updates = observed.observation.__aiter__()
        await asyncio.to_thread(httpx.put, f"{edge.url}/v1/kv/bulk/image", content=later)
        assert (await updates.__anext__()).payload == later
        observed.observation.cancel()

    run(scenario)
    assert httpx.get(f"{edge.url}/v1/kv/bulk/image?raw").content == later


def test_tokens_are_required_without_allow_anonymous(closed_edge):
    token = new_device(closed_edge, "dev-a", KVWrite=["a/"])
    base = f"{closed_edge.coap}/kv/a/k"

    async def scenario(client):
        anonymous = await request(client, Code.GET, base)
        assert anonymous.code == Code.UNAUTHORIZED and anonymous.payload.startswith(b"unauthorized: ")
        wrong = await request(client, Code.PUT, f"{base}?ep=dev-a&tk=nope", b"x", content_format=0)
        assert wrong.code == Code.UNAUTHORIZED
        unknown = await request(client, Code.POST, f"{closed_edge.coap}/rd?ep=stranger")
        assert unknown.code == Code.UNAUTHORIZED
        right = await request(client, Code.PUT, f"{base}?ep=dev-a&tk={token}", b"x", content_format=0)
        assert right.code == Code.CREATED
        elsewhere = await request(client, Code.PUT, f"{closed_edge.coap}/kv/b/k?ep=dev-a&tk={token}", b"x", content_format=0)
        assert elsewhere.code == Code.FORBIDDEN and b"KVWrite" in elsewhere.payload
        other = await request(client, Code.POST, f"{closed_edge.coap}/devices/dev-b/telemetry?tk={token}&ep=dev-a", b"")
        assert other.code == Code.BAD_REQUEST  # ep contradicts the path

    run(scenario)
    assert httpx.get(f"{closed_edge.url}/v1/devices/stranger").status_code == 404


def test_device_documents_are_validated_and_counted(edge):
    async def scenario(client):
        telemetry = f"{edge.coap}/devices/meter-1/telemetry"
        ok = await request(client, Code.POST, telemetry, cbor2.dumps({"t": 21.5}))
        assert ok.code == Code.CHANGED
        ok = await request(client, Code.PUT, f"{edge.coap}/devices/meter-1/reported", b'{"fw": "1.2"}', content_format=50)
        assert ok.code == Code.CHANGED
        not_a_map = await request(client, Code.POST, telemetry, cbor2.dumps([1, 2]))
        assert not_a_map.code == Code.BAD_REQUEST and not_a_map.payload.startswith(b"bad_document: ")
        text = await request(client, Code.POST, telemetry, b"t=1", content_format=0)
        assert text.code == Code.UNSUPPORTED_CONTENT_FORMAT
        desired = await request(client, Code.GET, f"{edge.coap}/devices/meter-1/desired", accept=50)
        assert desired.code == Code.CONTENT and json.loads(desired.payload) == {}
        wrong_method = await request(client, Code.GET, telemetry)
        assert wrong_method.code == Code.METHOD_NOT_ALLOWED and wrong_method.payload

    run(scenario)
    metrics = httpx.get(f"{edge.url}/metrics").text
    assert 'konsul_coap_device_documents_total{kind="telemetry"} 1.0' in metrics
    assert 'konsul_coap_device_documents_total{kind="reported"} 1.0' in metrics


def test_global_scope_and_unknown_scope(edge):
    httpx.put(f"{edge.url}/v1/kv/fleet/setting?dc=global", content=b"everywhere")

    async def scenario(client):
        found = await request(client, Code.GET, f"{edge.coap}/kv/fleet/setting?dc=global", accept=0)
        assert found.payload == b"everywhere"
        other = await request(client, Code.GET, f"{edge.coap}/kv/fleet/setting?dc=elsewhere")
        assert other.code == Code.NOT_FOUND and other.payload.startswith(b"unknown_scope: ")

    run(scenario)


def test_telemetry_is_stored_reported_merges_or_replaces_and_desired_is_read(edge):
    async def exchange(client):
        base = f"{edge.coap}/devices/meter-2"
        for n in range(3):
            sent = await request(client, Code.POST, f"{base}/telemetry", cbor2.dumps({"seq": n, "kwh": 1.5 * n}))
            assert sent.code == Code.CHANGED, sent.payload
        bad_seq = await request(client, Code.POST, f"{base}/telemetry", cbor2.dumps({"seq": "one"}))
        assert bad_seq.code == Code.BAD_REQUEST
        await request(client, Code.POST, f"{base}/reported", cbor2.dumps({"fw": "2.0", "interval": 5}))
        merged = httpx.get(f"{edge.url}/v1/devices/meter-2/reported").json()
        await request(client, Code.PUT, f"{base}/reported", cbor2.dumps({"interval": 10}))
        replaced = httpx.get(f"{edge.url}/v1/devices/meter-2/reported").json()
        httpx.put(f"{edge.url}/v1/devices/meter-2/desired", json={"interval": 10, "led": True}).raise_for_status()
        desired = await request(client, Code.GET, f"{base}/desired")
        return merged, replaced, cbor2.loads(desired.payload)

    merged, replaced, desired = run(exchange)
    assert merged == {"fw": "2.0", "interval": 5}
    assert replaced == {"interval": 10}
    assert desired == {"interval": 10, "led": True}
    samples = httpx.get(f"{edge.url}/v1/devices/meter-2/telemetry").json()
    assert [(s["Seq"], s["Data"]["kwh"]) for s in samples] == [(0, 0.0), (1, 1.5), (2, 3.0)]
    assert httpx.get(f"{edge.url}/v1/devices/meter-2/twin").json()["Delta"] == {"led": True}

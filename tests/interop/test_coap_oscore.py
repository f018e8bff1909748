"""OSCORE (RFC 8613) devices against a real edge: provisioned over HTTP, talking with aiocoap's client.

The edge runs with ACLs on and its defaults otherwise, so URI tokens (``tk=``)
are off; the material ``PUT /v1/devices/<id>?oscore=true`` returns is saved as
aiocoap client credentials, exactly as docs/coap.md tells users to.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import httpx
import pytest
from aiocoap import CON, Context, Message
from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import MANAGEMENT_TOKEN, EdgeProcess, HubProcess, eventually, free_port, free_udp_port  # noqa: E402
from test_coap_aiocoap import request  # noqa: E402
from test_coap_aiocoap import run as plain  # noqa: E402

TEXT = 0  # Content-Format text/plain


class OscoreEdge(EdgeProcess):
    """`konsul edge` with ACLs on and CoAP at its defaults (no URI tokens)."""

    def __init__(self, data_dir: Path, extra: list[str] | None = None) -> None:
        super().__init__(data_dir, acl=True, coap_uri_tokens=False, extra=["--coap-addr", "127.0.0.1:0", *(extra or [])])
        host, port = self.coap_addr()
        self.coap = f"coap://{host}:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10, headers={"X-Consul-Token": MANAGEMENT_TOKEN})

    def stop(self, *args, **kwargs) -> int:
        self.http.close()
        return super().stop(*args, **kwargs)

    def provision(self, device_id: str, body: dict | None = None, token: str | None = None) -> dict:
        headers = {"X-Consul-Token": token} if token else {}
        reply = self.http.put(f"/v1/devices/{device_id}?oscore=true", json=body or {}, headers=headers)
        assert reply.status_code in (200, 201), reply.text
        return reply.json()

    def kv(self, key: str) -> bytes | None:
        reply = self.http.get(f"/v1/kv/{key}?raw")
        return reply.content if reply.status_code == 200 else None

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    process = OscoreEdge(tmp_path_factory.mktemp("oscore-edge"))
    yield process
    process.stop()


def save_context(directory: Path, device: dict) -> Path:
    """The device's side, as docs/coap.md shows: ``OSCORE.Aiocoap`` saved as ``secret.json``."""
    directory.mkdir(mode=0o700, parents=True)
    (directory / "secret.json").write_text(json.dumps(device["OSCORE"]["Aiocoap"]))
    return directory


def oscore(edge: OscoreEdge, context_dir: Path, coro_fn, *args):
    """Run ``coro_fn(client, *args)`` with an aiocoap client using ``context_dir`` for ``edge``."""

    async def main():
        client = await Context.create_client_context()
        client.client_credentials.load_from_dict({f"{edge.coap}/*": {"oscore": {"basedir": str(context_dir) + "/"}}})
        try:
            return await asyncio.wait_for(coro_fn(client, *args), 30)
        finally:
            await client.shutdown()
            for credential in client.client_credentials.values():
                if getattr(credential, "lockfile", None) is not None:
                    credential._destroy()  # writes the sequence number back and unlocks the directory

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def protected_datagram(context_dir: Path, code: Code, path: tuple[str, ...], payload: bytes = b"") -> bytes:
    """One OSCORE-protected confirmable request as bytes on the wire, to send (and replay) by hand."""
    from aiocoap.oscore import FilesystemSecurityContext

    context = FilesystemSecurityContext(str(context_dir))
    try:
        inner = Message(code=code, uri_path=path, payload=payload, content_format=TEXT if payload else None)
        outer, _ = context.protect(inner)
    finally:
        context._destroy()
    outer.mtype, outer.mid, outer.token = CON, 1, b"\x01\x02"
    return outer.encode()


def exchange(edge: OscoreEdge, datagram: bytes, mid: int) -> Message:
    """Send ``datagram`` with message ID ``mid`` (a new one is a new message, not a retransmission).

    Returns the response: piggybacked on the ACK or, when the edge needs more
    than aiocoap's EMPTY_ACK_DELAY (0.1 s: a write's commit on a loaded
    machine), the separate response after an empty ACK (RFC 7252 5.2.2),
    acknowledged if confirmable so the edge does not send it again.
    """
    host, port = edge.coap.removeprefix("coap://").rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(datagram[:2] + mid.to_bytes(2, "big") + datagram[4:], (host, int(port)))
        while (answer := Message.decode(sock.recv(4096))).code == Code.EMPTY:
            pass  # the empty ACK: the response follows in a message of its own
        if answer.mtype == CON:
            sock.sendto(bytes([0x60, 0]) + answer.mid.to_bytes(2, "big"), (host, int(port)))  # an empty ACK
        return answer


# -- provisioning ------------------------------------------------------------------------------


def test_provisioning_returns_the_context_once_and_keeps_the_secret_on_the_edge(edge, tmp_path):
    device = edge.provision("osc-prov", {"KVWrite": ["osc-prov/"]})
    material = device["OSCORE"]
    assert material["Algorithm"] == "AES-CCM-16-64-128" and material["IDContext"] is None
    assert len(bytes.fromhex(material["MasterSecret"])) == 32 and material["SenderID"] != material["RecipientID"]
    assert "Token" in device  # a new device gets its token as well

    shown = edge.http.get("/v1/devices/osc-prov").json()
    assert shown["OSCORE"] == {"SenderID": material["SenderID"]}  # the ID only, ever after

    # The secret is on this edge's disk, private, and nowhere else: not in the
    # replicated store (which goes to the hub), not in the audit log.
    context_dir = edge.data_dir / "oscore" / material["SenderID"]
    assert stat.S_IMODE(os.stat(edge.data_dir / "oscore").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(context_dir / "secret.json").st_mode) == 0o600
    secret = bytes.fromhex(material["MasterSecret"])
    for path in edge.data_dir.rglob("*"):
        if path.is_file() and context_dir not in path.parents:
            data = path.read_bytes()
            assert secret not in data and material["MasterSecret"].encode() not in data, path

    # Only where the edge serves the device: not for another scope.
    reply = edge.http.put("/v1/devices/osc-prov?oscore=true&dc=global", json={})
    assert reply.status_code == 400 and "OSCORE" in reply.json()["detail"]


def test_the_hub_makes_no_contexts(tmp_path):
    hub = HubProcess(tmp_path / "hub", acl=True)
    try:
        reply = httpx.put(f"{hub.url}/v1/devices/d1?oscore=true&dc=global", json={},
                          headers={"X-Consul-Token": MANAGEMENT_TOKEN})
        assert reply.status_code == 400 and "the edge that serves the device" in reply.json()["detail"]
        shown = httpx.get(f"{hub.url}/v1/devices/d1?dc=global", headers={"X-Consul-Token": MANAGEMENT_TOKEN})
        assert shown.status_code == 404  # refused before anything was written
    finally:
        hub.stop()


def test_an_edge_loads_no_oscore_code_until_a_device_uses_it():
    """aiocoap.oscore (and cryptography with it) costs ~12 MB of RSS: only on first use."""
    import subprocess

    modules = "konsul.edge.agent", "konsul.protocols.coap.site", "konsul.protocols.oscore_contexts"
    script = f"import sys; import {', '.join(modules)}; print('aiocoap.oscore' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout == "False\n"


def test_provisioning_needs_device_write_on_that_device(edge):
    def token_for(rules: str) -> str:
        name = f"p{abs(hash(rules)) % 10**8}"
        assert edge.http.put("/v1/acl/policy", json={"Name": name, "Rules": rules}).status_code == 200
        return edge.http.put("/v1/acl/token", json={"Policies": [{"Name": name}]}).json()["SecretID"]

    edge.provision("osc-acl", {"KVRead": []})
    reader = token_for('device "osc-acl" { policy = "read" }')
    reply = edge.http.put("/v1/devices/osc-acl?oscore=true", json={}, headers={"X-Consul-Token": reader})
    assert reply.status_code == 403 and reply.json()["error"] == "permission_denied"
    writer = token_for('device "osc-acl" { policy = "write" }')
    assert "OSCORE" in edge.provision("osc-acl", token=writer)


# -- requests --------------------------------------------------------------------------------


def test_an_oscore_device_reads_and_writes_kv_and_posts_telemetry(edge, tmp_path):
    device = edge.provision("osc-1", {"KVWrite": ["osc-1/"]})
    context_dir = save_context(tmp_path / "osc-1", device)

    async def talk(client):
        put = await request(client, Code.PUT, f"{edge.coap}/kv/osc-1/temp", b"21.5", content_format=TEXT)
        got = await request(client, Code.GET, f"{edge.coap}/kv/osc-1/temp", accept=TEXT)
        posted = await request(
            client, Code.POST, f"{edge.coap}/devices/osc-1/telemetry", b'{"t": 21.5}', content_format=50
        )
        reported = await request(client, Code.POST, f"{edge.coap}/devices/osc-1/reported", b'{"fw": "1.2"}', content_format=50)
        assert reported.code == Code.CHANGED, reported.payload
        refused = await request(client, Code.PUT, f"{edge.coap}/kv/elsewhere", b"x", content_format=TEXT)
        return put, got, posted, refused

    put, got, posted, refused = oscore(edge, context_dir, talk)
    assert put.code in (Code.CREATED, Code.CHANGED), put.payload
    assert got.code == Code.CONTENT and got.payload == b"21.5"
    assert posted.code == Code.CHANGED, posted.payload
    assert refused.code == Code.FORBIDDEN  # the device's own rights, as with a token
    assert edge.kv("osc-1/temp") == b"21.5"
    eventually(lambda: edge.http.get("/v1/devices/osc-1/telemetry").json(), what="the telemetry sample")
    assert edge.http.get("/v1/devices/osc-1/reported").json() == {"fw": "1.2"}
    shown = edge.http.get("/v1/devices/osc-1").json()
    assert shown["Online"] and shown["Protocol"] == "coap"


def test_desired_state_is_observed_over_oscore(edge, tmp_path):
    device = edge.provision("osc-obs")
    context_dir = save_context(tmp_path / "osc-obs", device)
    assert edge.http.put("/v1/devices/osc-obs/desired", json={"interval": 5}).status_code == 200

    async def observe(client):
        watching = client.request(Message(code=Code.GET, uri=f"{edge.coap}/devices/osc-obs/desired", observe=0, accept=50))
        first = await watching.response
        await asyncio.to_thread(edge.http.put, "/v1/devices/osc-obs/desired", json={"interval": 9})
        notification = await watching.observation.__aiter__().__anext__()
        watching.observation.cancel()
        return first, notification

    first, notification = oscore(edge, context_dir, observe)
    assert first.code == Code.CONTENT and json.loads(first.payload) == {"interval": 5}
    assert json.loads(notification.payload) == {"interval": 9}


def test_registration_and_a_large_value_over_oscore(edge, tmp_path):
    device = edge.provision("osc-rd", {"KVWrite": ["osc-rd/"]})
    context_dir = save_context(tmp_path / "osc-rd", device)
    large = bytes(range(256)) * 12  # 3 KiB: block-wise inside the protection

    async def talk(client):
        registered = await request(
            client, Code.POST, f"{edge.coap}/rd?ep=osc-rd&lt=60", b'</t>;rt="temperature"', content_format=40
        )
        other = await request(client, Code.POST, f"{edge.coap}/rd?ep=someone-else&lt=60", b"", content_format=40)
        put = await request(client, Code.PUT, f"{edge.coap}/kv/osc-rd/blob", large, content_format=42)
        got = await request(client, Code.GET, f"{edge.coap}/kv/osc-rd/blob", accept=42)
        return registered, other, put, got

    registered, other, put, got = oscore(edge, context_dir, talk)
    assert registered.code == Code.CREATED, registered.payload
    assert other.code == Code.BAD_REQUEST and b"contradicts the OSCORE context" in other.payload
    assert put.code in (Code.CREATED, Code.CHANGED) and got.payload == large
    assert edge.kv("osc-rd/blob") == large
    assert edge.http.get("/v1/devices/osc-rd").json()["Online"]


def test_without_oscore_and_with_a_uri_token_requests_are_refused_by_default(edge):
    token = edge.provision("osc-plain", {"KVWrite": ["osc-plain/"]})["Token"]

    async def talk(client):
        bare = await request(client, Code.GET, f"{edge.coap}/kv/osc-plain/x?ep=osc-plain")
        with_token = await request(
            client, Code.PUT, f"{edge.coap}/kv/osc-plain/x?ep=osc-plain&tk={token}", b"v", content_format=TEXT
        )
        return bare, with_token

    bare, with_token = plain(talk)
    assert bare.code == Code.UNAUTHORIZED
    assert with_token.code == Code.UNAUTHORIZED
    assert with_token.payload.startswith(b"uri_tokens_off:") and b"--coap-uri-tokens on" in with_token.payload
    assert b"OSCORE" in with_token.payload
    assert edge.kv("osc-plain/x") is None


def test_a_uri_token_is_accepted_with_the_flag(tmp_path):
    process = EdgeProcess(
        tmp_path / "edge", acl=True, coap_uri_tokens=False,
        extra=["--coap-addr", "127.0.0.1:0", "--coap-uri-tokens", "on"],
    )
    try:
        host, port = process.coap_addr()
        headers = {"X-Consul-Token": MANAGEMENT_TOKEN}
        token = httpx.put(f"{process.url}/v1/devices/tk-1", json={"KVWrite": ["tk/"]}, headers=headers).json()["Token"]
        reply = plain(lambda c: request(c, Code.PUT, f"coap://{host}:{port}/kv/tk/x?ep=tk-1&tk={token}", b"v",
                                        content_format=TEXT))
        assert reply.code in (Code.CREATED, Code.CHANGED), reply.payload
    finally:
        process.stop()


def test_unknown_context_wrong_key_and_replay_are_refused_and_counted(edge, tmp_path):
    device = edge.provision("osc-bad", {"KVWrite": ["osc-bad/"]})
    context_dir = save_context(tmp_path / "good", device)
    unknown = json.loads(json.dumps(device))
    unknown["OSCORE"]["Aiocoap"]["sender-id_hex"] = "0badc0de"
    wrong_key = json.loads(json.dumps(device))
    wrong_key["OSCORE"]["Aiocoap"]["secret_hex"] = "00" * 32
    before = {
        reason: edge.metric(f'konsul_coap_refused_total{{reason="{reason}"}}')
        for reason in ("oscore_unknown_context", "oscore_decrypt", "oscore_replay")
    }

    put = (Code.PUT, ("kv", "osc-bad", "v"), b"first")
    unknown_reply = exchange(edge, protected_datagram(save_context(tmp_path / "unknown", unknown), *put), 10)
    wrong_reply = exchange(edge, protected_datagram(save_context(tmp_path / "wrong", wrong_key), *put), 11)
    datagram = protected_datagram(context_dir, *put)
    accepted = exchange(edge, datagram, 12)
    assert edge.kv("osc-bad/v") == b"first"
    edge.http.put("/v1/kv/osc-bad/v", content=b"second")
    replayed = exchange(edge, datagram, 13)  # the same protected request as a new message

    assert unknown_reply.code == Code.UNAUTHORIZED and b"oscore_unknown_context" in unknown_reply.payload
    assert wrong_reply.code == Code.BAD_REQUEST and b"decryption failed" in wrong_reply.payload  # RFC 8613 8.2
    assert accepted.code == Code.CHANGED and accepted.opt.oscore is not None  # the outer code of a protected answer
    assert replayed.code == Code.UNAUTHORIZED and b"replay" in replayed.payload
    assert edge.kv("osc-bad/v") == b"second"  # the replay changed nothing
    for reason, count in before.items():
        assert edge.metric(f'konsul_coap_refused_total{{reason="{reason}"}}') == count + 1, reason
    assert edge.proc.poll() is None and edge.http.get("/v1/status/leader").status_code == 200


def test_malformed_oscore_options_are_refused_and_the_edge_stays_up(edge, tmp_path):
    device = edge.provision("osc-junk", {"KVWrite": ["osc-junk/"]})  # so that contexts exist and are looked up
    context_dir = save_context(tmp_path / "ctx", device)
    kid = bytes.fromhex(device["OSCORE"]["SenderID"])
    options = [
        b"\x18",  # kid context flag without the context
        b"\x07\x01",  # a 7-byte partial IV announced, one present
        b"\xe9" + kid,  # reserved bits
        b"\x09\x01" + kid,  # a valid header: the ciphertext is what is wrong
    ]
    for number, value in enumerate(options):
        # CON POST, no token, MID; the OSCORE option (9): delta 9, length; a payload of junk
        datagram = bytes([0x40, 0x02, 0x7F, number, 0x90 | len(value)]) + value + b"\xff" + b"\x00" * 12
        answer = exchange(edge, datagram, 50 + number)
        assert answer.code in (Code.BAD_OPTION, Code.BAD_REQUEST), (value, answer)
    write = (Code.PUT, ("kv", "osc-junk", "v"), b"fine")
    assert exchange(edge, protected_datagram(context_dir, *write), 60).code == Code.CHANGED
    assert edge.kv("osc-junk/v") == b"fine"


# -- rotation, deletion, restarts ------------------------------------------------------------------


def test_rotation_ends_the_old_context_and_its_observations_at_once(edge, tmp_path):
    old = edge.provision("osc-rot", {"KVWrite": ["osc-rot/"]})
    old_dir = save_context(tmp_path / "old", old)
    write = (Code.PUT, ("kv", "osc-rot", "v"), b"x")
    assert exchange(edge, protected_datagram(old_dir, *write), 20).code == Code.CHANGED

    async def observe_then_rotate(client):
        watching = client.request(Message(code=Code.GET, uri=f"{edge.coap}/devices/osc-rot/desired", observe=0))
        await watching.response

        async def last_notification():
            ended = None
            try:
                async for notification in watching.observation:
                    ended = notification
            except Exception as error:  # noqa: BLE001 - aiocoap ends an observation with an error response
                ended = getattr(error, "response", error)
            return ended

        # aiocoap hands a final notification only to an iterator already waiting
        # for it: it delivers the notification and the end of the observation in
        # one step, and an iterator that is not waiting yet keeps only the end.
        # The 4.01 can reach us before the HTTP answer to the rotation does, so
        # the iterator waits first (one pass of the loop runs the task up to its wait).
        ending = asyncio.create_task(last_notification())
        await asyncio.sleep(0)
        new = await asyncio.to_thread(edge.provision, "osc-rot")
        return new, await ending

    new, ended = oscore(edge, old_dir, observe_then_rotate)
    assert getattr(ended, "code", None) == Code.UNAUTHORIZED, ended
    assert new["OSCORE"]["SenderID"] != old["OSCORE"]["SenderID"]
    assert not (edge.data_dir / "oscore" / old["OSCORE"]["SenderID"]).exists()
    assert exchange(edge, protected_datagram(old_dir, *write), 21).code == Code.UNAUTHORIZED
    new_dir = save_context(tmp_path / "new", new)
    assert exchange(edge, protected_datagram(new_dir, *write), 22).code == Code.CHANGED


def test_deleting_the_device_removes_its_context(edge, tmp_path):
    device = edge.provision("osc-del", {"KVWrite": ["osc-del/"]})
    context_dir = save_context(tmp_path / "ctx", device)
    write = (Code.PUT, ("kv", "osc-del", "v"), b"x")
    assert exchange(edge, protected_datagram(context_dir, *write), 30).code == Code.CHANGED
    assert edge.http.delete("/v1/devices/osc-del").json() is True
    assert not (edge.data_dir / "oscore" / device["OSCORE"]["SenderID"]).exists()
    assert exchange(edge, protected_datagram(context_dir, *write), 31).code == Code.UNAUTHORIZED
    # Registered again without ?oscore, the device has no context.
    edge.http.put("/v1/devices/osc-del", json={})
    assert edge.http.get("/v1/devices/osc-del").json()["OSCORE"] is None
    assert exchange(edge, protected_datagram(context_dir, *write), 32).code == Code.UNAUTHORIZED


def test_after_kill_9_the_device_still_talks_and_old_requests_stay_refused(tmp_path):
    ports = ["--http-addr", f"127.0.0.1:{free_port()}", "--coap-addr", f"127.0.0.1:{free_udp_port()}"]
    data_dir = tmp_path / "edge"
    edge = OscoreEdge(data_dir, extra=ports)
    try:
        device = edge.provision("osc-k9", {"KVWrite": ["k9/"]})
        context_dir = save_context(tmp_path / "ctx", device)
        captured = protected_datagram(context_dir, Code.PUT, ("kv", "k9", "v"), b"old")
        assert exchange(edge, captured, 40).code == Code.CHANGED
        put_new = oscore(edge, context_dir, lambda c: request(c, Code.PUT, f"{edge.coap}/kv/k9/v", b"new", content_format=TEXT))
        assert put_new.code == Code.CHANGED
        edge.stop(signal.SIGKILL)

        edge = OscoreEdge(data_dir, extra=ports)
        # The replay window was not written back: the edge cannot tell a replay
        # from a fresh request, so it answers 4.01 with Echo (RFC 8613 B.1.2) and acts on nothing.
        replayed = exchange(edge, captured, 41)
        assert replayed.opt.oscore is not None  # the 4.01 Echo goes inside the protection
        assert edge.metric('konsul_coap_refused_total{reason="oscore_echo"}') == 1
        assert edge.kv("k9/v") == b"new"
        # A real device answers the Echo (aiocoap does) and goes on.
        put_after = oscore(
            edge, context_dir, lambda c: request(c, Code.PUT, f"{edge.coap}/kv/k9/v", b"after", content_format=TEXT)
        )
        assert put_after.code == Code.CHANGED, put_after.payload
        assert edge.kv("k9/v") == b"after"
        assert exchange(edge, captured, 42).code == Code.UNAUTHORIZED
        assert edge.kv("k9/v") == b"after"

        # A clean stop writes the window back: after it, the old request is a plain replay.
        edge.stop()
        edge = OscoreEdge(data_dir, extra=ports)
        replayed = exchange(edge, captured, 43)
        assert replayed.code == Code.UNAUTHORIZED and b"replay" in replayed.payload
        assert edge.kv("k9/v") == b"after"
    finally:
        edge.stop()

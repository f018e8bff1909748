"""Who may sync: site join tokens at a real hub with ACLs on, against real edges and raw
WebSocket clients that try what an attacker on the network would."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import cbor2
import httpx
import pytest
import trio
import trustme
from agents import MANAGEMENT_TOKEN, EdgeProcess, HubProcess, eventually, join_token
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from konsul.sync.wire import PROTOCOL_VERSION, encode

ADMIN = {"X-Consul-Token": MANAGEMENT_TOKEN}


def hello(site: str, scopes: list[str] | None = None, now_ms: int | None = None) -> bytes:
    return encode({
        "t": "hello", "v": PROTOCOL_VERSION, "site": site, "replica": "abcdefabcdef", "role": "edge",
        "scopes": [site, "global"] if scopes is None else scopes,
        "now": int(time.time() * 1000) if now_ms is None else now_ms,
    })


def talk(hub: HubProcess, frames: list[bytes], token: str | None = None, until=None) -> list[dict]:
    """Send ``frames`` on a sync connection presenting ``token``; what came back, until ``until`` or close.

    Raises ``ConnectionRejected`` when the hub refuses the WebSocket handshake.
    """
    headers = [] if token is None else [(b"X-Konsul-Site-Token", token.encode())]
    received: list[dict] = []

    async def run() -> None:
        with trio.fail_after(10):
            async with open_websocket_url(hub.url.replace("http://", "ws://") + "/v1/sync",
                                          extra_headers=headers) as ws:
                for frame in frames:
                    await ws.send_message(frame)
                try:
                    while until is None or not until(received):
                        received.append(cbor2.loads(await ws.get_message()))
                except ConnectionClosed:
                    pass

    trio.run(run)
    return received


def error_of(messages: list[dict]) -> str | None:
    return next((m["code"] for m in messages if m.get("t") == "error"), None)


def datacenters(hub: HubProcess) -> list[str]:
    return httpx.get(f"{hub.url}/v1/catalog/datacenters", headers=ADMIN).json()


def sync_status(edge: EdgeProcess) -> dict:
    return httpx.get(f"{edge.url}/v1/sync/status", headers=ADMIN).json()["Peers"][0]


def konsul(*args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KONSUL_", "CONSUL_"))}
    return subprocess.run([sys.executable, "-m", "konsul.cli", *args], capture_output=True, env=environ,
                          timeout=60)


@pytest.fixture
def hub(tmp_path):
    hub = HubProcess(tmp_path / "hub", acl=True)
    yield hub
    hub.stop()


def test_no_credential_no_sync_and_nothing_created(hub):
    join_token(hub, "plant-1")
    for token in (None, "ksite-made-up", MANAGEMENT_TOKEN, ""):
        with pytest.raises(ConnectionRejected) as refused:
            talk(hub, [hello("plant-1")], token)
        assert refused.value.status_code == 401
    assert "plant-1" not in datacenters(hub)
    metrics = httpx.get(f"{hub.url}/metrics", headers=ADMIN).text
    assert 'konsul_sync_refused_total{reason="unauthorized"}' in metrics


def test_a_site_token_syncs_its_own_site_only(hub):
    token = join_token(hub, "plant-1")
    # Another site's name, or another site's scope beside its own: refused before anything opens.
    assert error_of(talk(hub, [hello("plant-2")], token)) == "site_not_allowed"
    assert error_of(talk(hub, [hello("plant-1", ["plant-1", "plant-2", "global"])], token)) == "scope_not_allowed"
    assert error_of(talk(hub, [hello("plant-1", ["plant-1", "plant-3"])], token)) == "scope_not_allowed"
    assert not {"plant-2", "plant-3"} & set(datacenters(hub))
    # Its own site and global it may sync.
    answer = talk(hub, [hello("plant-1")], token, until=lambda got: any(m.get("t") == "hello" for m in got))
    [reply] = [m for m in answer if m["t"] == "hello"]
    assert reply["scopes"] == ["plant-1", "global"]


def test_a_clock_far_ahead_is_refused_and_counted(hub):
    token = join_token(hub, "plant-1")
    ahead = int(time.time() * 1000) + 3600 * 1000  # an hour ahead; 300 s is accepted
    assert error_of(talk(hub, [hello("plant-1", now_ms=ahead)], token)) == "clock_skew"
    assert 'konsul_sync_refused_total{reason="clock_skew"} 1.0' in httpx.get(f"{hub.url}/metrics", headers=ADMIN).text


def test_an_edge_syncs_with_its_token_global_is_read_only_and_revoking_ends_the_session(tmp_path, hub):
    hub_admin = httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN)
    assert hub_admin.put("/v1/kv/fleet/setting?dc=global", content=b"from-hub").json() is True
    edge = EdgeProcess(tmp_path / "edge", site="plant-1", hub_url=hub.url, acl=True,
                       extra=["--site-token", join_token(hub, "plant-1")])
    try:
        admin = httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN)
        eventually(lambda: admin.get("/v1/kv/fleet/setting?dc=global&raw").content == b"from-hub",
                   what="global at the edge")
        assert admin.put("/v1/kv/local", content=b"1").json() is True
        eventually(lambda: hub_admin.get("/v1/kv/local?dc=plant-1&raw").content == b"1", what="the write at the hub")
        # A read-only site's changes to global stay at the edge.
        assert admin.put("/v1/kv/fleet/setting?dc=global", content=b"from-edge").json() is True
        eventually(lambda: "refused a peer's change to global/kv" in hub.output, what="the refusal at the hub")
        assert hub_admin.get("/v1/kv/fleet/setting?dc=global&raw").content == b"from-hub"

        # Revoked (`konsul sites revoke`): the open session ends and the edge cannot come back.
        revoked = konsul("sites", "revoke", "plant-1", "--http-addr", hub.addr, "--token", MANAGEMENT_TOKEN)
        assert revoked.returncode == 0, revoked.stderr
        eventually(lambda: not sync_status(edge)["Connected"], what="the session ended")
        eventually(lambda: "site_credential_required" in (sync_status(edge)["LastError"] or "")
                   or "site_revoked" in (sync_status(edge)["LastError"] or ""), what="the reason at the edge")
        assert admin.put("/v1/kv/after-revoke", content=b"1").json() is True
        listed = konsul("sites", "list", "--http-addr", hub.addr, "--token", MANAGEMENT_TOKEN, "--format", "json")
        [site] = [s for s in __import__("json").loads(listed.stdout) if s["Site"] == "plant-1"]
        assert site["Credential"]["Revoked"] is True and site["Connected"] is False
        assert hub_admin.get("/v1/kv/after-revoke?dc=plant-1").status_code == 404
    finally:
        edge.stop()


def test_konsul_sites_add_prints_a_token_once_and_adding_again_rotates_it(hub):
    first = konsul("sites", "add", "plant-7", "--http-addr", hub.addr, "--token", MANAGEMENT_TOKEN)
    assert first.returncode == 0, first.stderr
    token = first.stdout.decode().strip()
    assert token.startswith("ksite-") and b"shown once" in first.stderr
    assert error_of(talk(hub, [hello("plant-7", now_ms=0)], token, until=lambda got: got)) is None
    rotated = konsul("sites", "add", "plant-7", "--http-addr", hub.addr, "--token", MANAGEMENT_TOKEN).stdout.decode().strip()
    assert rotated != token
    with pytest.raises(ConnectionRejected):
        talk(hub, [hello("plant-7")], token)
    # The hub keeps only the hash: the secret is nowhere in its data directory.
    for path in hub.data_dir.rglob("*"):
        if path.is_file():
            assert rotated.encode() not in path.read_bytes()
    # Without operator:write, no token.
    refused = konsul("sites", "add", "plant-8", "--http-addr", hub.addr)
    assert refused.returncode != 0 and b"403" in refused.stderr or b"permission" in refused.stderr


def telemetry(device: str, seq: int, batch: int) -> bytes:
    rows = [[device, seq, int(time.time() * 1000), cbor2.dumps({"t": 20.0 + seq % 10})]]
    return encode({"t": "eph", "s": "plant-2", "k": "telemetry", "d": {"b": batch, "x": rows}})


def acked(messages: list[dict]) -> bool:
    return any(m.get("k") == "telemetry-ack" for m in messages)


def test_telemetry_is_stored_only_for_the_sessions_own_devices(hub):
    hub_admin = httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN)
    plant_2 = join_token(hub, "plant-2")
    for site, device in (("plant-1", "pump-1"), ("plant-2", "fan-2")):
        # A site's scope exists at the hub once the site has synced.
        talk(hub, [hello(site)], join_token(hub, site) if site == "plant-1" else plant_2,
             until=lambda got: any(m.get("t") == "hello" for m in got))
        assert hub_admin.put(f"/v1/devices/{device}?dc={site}", json={"Type": "sensor"}).status_code == 201

    def send(device: str, seq: int, batch: int) -> dict:
        got = talk(hub, [hello("plant-2"), telemetry(device, seq, batch)], plant_2, until=acked)
        return next(m["d"] for m in got if m.get("k") == "telemetry-ack")

    def stored(site: str, device: str) -> list[int]:
        response = hub_admin.get(f"/v1/devices/{device}/telemetry?dc={site}")
        return [s["Seq"] for s in response.json()] if response.status_code == 200 else []

    # plant-2 naming plant-1's device: never stored anywhere.
    assert send("pump-1", 5, 1) == {"b": 1, "ok": False, "refused": 0}
    assert stored("plant-1", "pump-1") == [] and stored("plant-2", "pump-1") == []
    # Its own device: stored; a sequence number far ahead of the device's is refused and counted.
    assert send("fan-2", 5, 2) == {"b": 2, "ok": True, "refused": 0}
    assert send("fan-2", 5 + 2**40, 3) == {"b": 3, "ok": True, "refused": 1}
    assert send("fan-2", 6, 4) == {"b": 4, "ok": True, "refused": 0}
    assert stored("plant-2", "fan-2") == [5, 6]
    # A deleted device's samples are refused for good.
    assert hub_admin.delete("/v1/devices/fan-2?dc=plant-2").status_code == 200
    assert send("fan-2", 7, 5) == {"b": 5, "ok": True, "refused": 1}
    metrics = httpx.get(f"{hub.url}/metrics", headers=ADMIN).text
    assert 'konsul_telemetry_refused_total{reason="seq_too_far_ahead"} 1.0' in metrics
    assert 'konsul_telemetry_refused_total{reason="unknown_device"} 1.0' in metrics


def test_a_client_certificate_naming_an_added_site_is_its_credential(tmp_path):
    servers, sites = trustme.CA(), trustme.CA()  # the hub's CA, and the one that signs sites' certificates
    pki = tmp_path / "pki"
    pki.mkdir()
    servers.cert_pem.write_to_path(str(pki / "ca.pem"))
    sites.cert_pem.write_to_path(str(pki / "sites-ca.pem"))
    served = servers.issue_cert("127.0.0.1", "localhost")
    served.cert_chain_pems[0].write_to_path(str(pki / "hub.pem"))
    served.private_key_pem.write_to_path(str(pki / "hub-key.pem"))

    def site_certificate(name: str) -> list[str]:
        issued = sites.issue_cert(f"{name}.sites.test", common_name=name)
        issued.cert_chain_pems[0].write_to_path(str(pki / f"{name}.pem"))
        issued.private_key_pem.write_to_path(str(pki / f"{name}-key.pem"))
        return ["--site-cert", str(pki / f"{name}.pem"), "--site-key", str(pki / f"{name}-key.pem")]

    # Client certificates are asked for, not required: operators and token-bearing edges come in without.
    hub = HubProcess(tmp_path / "hub", acl=True, extra=[
        "--tls-cert", str(pki / "hub.pem"), "--tls-key", str(pki / "hub-key.pem"), "--tls-ca", str(pki / "sites-ca.pem"),
    ])
    verify = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    hub_admin = httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN, verify=verify)
    join_token(hub, "plant-1", verify=verify)  # added: its certificate is now a credential; the token is not used
    pinned = ["--hub-ca", str(pki / "ca.pem"), "--mqtts-addr", "off"]
    member = EdgeProcess(tmp_path / "member", site="plant-1", hub_url=hub.url, acl=True,
                         extra=[*pinned, *site_certificate("plant-1")])
    never_added = EdgeProcess(tmp_path / "never-added", site="plant-2", hub_url=hub.url, acl=True,
                              extra=[*pinned, *site_certificate("plant-2")])
    impostor = EdgeProcess(tmp_path / "impostor", site="plant-3", hub_url=hub.url, acl=True,
                           extra=[*pinned, "--site-cert", str(pki / "plant-1.pem"), "--site-key", str(pki / "plant-1-key.pem")])
    try:
        assert httpx.put(f"{member.url}/v1/kv/line/speed", content=b"42", headers=ADMIN).json() is True
        eventually(lambda: hub_admin.get("/v1/kv/line/speed?dc=plant-1&raw").content == b"42",
                   what="the certified site's write at the hub")
        error = eventually(lambda: sync_status(never_added)["LastError"], what="the unknown site refused")
        assert "401" in error or "site_credential_required" in error, error
        error = eventually(lambda: sync_status(impostor)["LastError"], what="plant-1's certificate for plant-3 refused")
        assert "site_not_allowed" in error, error
        assert not {"plant-2", "plant-3"} & set(hub_admin.get("/v1/catalog/datacenters").json())
        # Revoking the site ends the certificate's session and it opens nothing after.
        assert hub_admin.delete("/v1/sites/plant-1").status_code == 200
        eventually(lambda: not sync_status(member)["Connected"], what="the revoked site's session ended")
    finally:
        for agent in (member, never_added, impostor, hub):
            agent.stop()

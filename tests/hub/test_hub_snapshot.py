"""Hub snapshots: every site's store and the hub's own state in one archive (GET/PUT /v1/snapshot, konsul snapshot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from agents import MANAGEMENT_TOKEN, EdgeProcess, HubProcess, eventually, join_token

ADMIN = {"X-Consul-Token": MANAGEMENT_TOKEN}
SITES = ("plant-1", "plant-2")


def konsul(*args: str, addr: str | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KONSUL_")}
    if addr is not None:
        environ.update(KONSUL_HTTP_ADDR=addr, KONSUL_HTTP_TOKEN=MANAGEMENT_TOKEN)
    return subprocess.run([sys.executable, "-m", "konsul.cli", *args], capture_output=True, env=environ,
                          timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout.decode()


def edge_for(hub: HubProcess, tmp_path, site: str, token: str) -> EdgeProcess:
    return EdgeProcess(tmp_path / site, site=site, hub_url=hub.url, acl=True, extra=["--site-token", token])


def at_hub(hub: HubProcess, key: str, site: str) -> bytes | None:
    with httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN) as client:
        response = client.get(f"/v1/kv/{key}", params={"dc": site, "raw": "true"})
        return response.content if response.status_code == 200 else None


def test_hub_snapshot_holds_every_site_and_the_hubs_own_state(tmp_path):
    hub = HubProcess(tmp_path / "hub", acl=True)
    tokens = {site: join_token(hub, site) for site in SITES}
    edges = {site: edge_for(hub, tmp_path, site, tokens[site]) for site in SITES}
    try:
        for site, edge in edges.items():
            with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as client:
                assert client.put(f"/v1/kv/cfg/{site}", content=site.encode()).json() is True
        for site in SITES:
            eventually(lambda site=site: at_hub(hub, f"cfg/{site}", site) == site.encode(), what=f"{site} at the hub")
        with httpx.Client(base_url=hub.url, timeout=10, headers=ADMIN) as admin:
            policy = admin.put("/v1/acl/policy", json={"Name": "reader", "Rules": 'key_prefix "" { policy = "read" }'})
            reader = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy.json()["ID"]}]}).json()["SecretID"]
            # An edge's archive is refused at a hub, and a hub with data refuses a restore unless forced.
            edge_archive = httpx.get(f"{edges['plant-1'].url}/v1/snapshot", headers=ADMIN, timeout=10).content
            refused = admin.put("/v1/snapshot", content=edge_archive, params={"force": "true"})
            assert refused.status_code == 400 and "edge's" in refused.json()["detail"]
            hub_archive = admin.get("/v1/snapshot")
            assert hub_archive.status_code == 200
            refused = admin.put("/v1/snapshot", content=hub_archive.content)
            assert refused.status_code == 409 and refused.json()["error"] == "has_data"
            assert httpx.get(f"{hub.url}/v1/snapshot", timeout=10).status_code == 403
        snap = tmp_path / "hub.snap"
        ok(konsul("snapshot", "save", str(snap), addr=hub.addr))
    finally:
        for edge in edges.values():
            edge.stop()
        hub.stop()

    shown = json.loads(ok(konsul("snapshot", "inspect", str(snap), "--format", "json")))
    assert shown["Role"] == "hub" and shown["Counts"]["SiteCredentials"] == 2
    assert {"global", *SITES} <= set(shown["Scopes"])
    assert all(shown["Scopes"][site]["Keys"] >= 1 for site in SITES)
    assert "SCOPE" in ok(konsul("snapshot", "inspect", str(snap)))

    # Offline, into a fresh data directory; an edge's directory is refused.
    edge_dir = tmp_path / "plant-1"
    result = konsul("snapshot", "restore", str(snap), "--data-dir", str(edge_dir), "--force")
    assert result.returncode == 1 and b"an edge's data directory" in result.stderr
    restored = json.loads(ok(konsul("snapshot", "restore", str(snap), "--data-dir", str(tmp_path / "new"),
                                    "--format", "json")))
    assert restored["Role"] == "hub"
    hub = HubProcess(tmp_path / "new", acl=True)
    edge = None
    try:
        for site in SITES:
            assert at_hub(hub, f"cfg/{site}", site) == site.encode()
        with httpx.Client(base_url=hub.url, timeout=10, headers={"X-Consul-Token": reader}) as client:
            assert client.get("/v1/kv/cfg/plant-2", params={"dc": "plant-2", "raw": "true"}).content == b"plant-2"
        # The sites' join tokens came back with the hub: an edge reconnects with its own and syncs.
        edge = edge_for(hub, tmp_path, "plant-1", tokens["plant-1"])
        with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as client:
            assert client.put("/v1/kv/after", content=b"restore").json() is True
        eventually(lambda: at_hub(hub, "after", "plant-1") == b"restore", what="a write after the restore")
    finally:
        if edge is not None:
            edge.stop()
        hub.stop()

    # Online, into a fresh hub: staged, then loaded at its next start.
    fresh = HubProcess(tmp_path / "fresh", acl=True)
    try:
        with open(snap, "rb") as body:
            staged = httpx.put(f"{fresh.url}/v1/snapshot", content=body, headers=ADMIN, timeout=30)
        assert staged.status_code == 200 and staged.json()["Role"] == "hub", staged.text
    finally:
        fresh.stop()
    fresh = HubProcess(tmp_path / "fresh", acl=True)
    try:
        assert at_hub(fresh, "cfg/plant-2", "plant-2") == b"plant-2"
    finally:
        fresh.stop()

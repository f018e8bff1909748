"""Snapshots (GET/PUT /v1/snapshot, konsul snapshot ...) and konsul kv export|import, on real edges."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
import threading
import time

import httpx
import pytest

from agents import MANAGEMENT_TOKEN, EdgeProcess
from test_client_commands import konsul, ok

ADMIN = {"X-Consul-Token": MANAGEMENT_TOKEN}


def test_snapshot_under_write_load_restores_every_acknowledged_key(tmp_path):
    edge = EdgeProcess(tmp_path / "live")
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            number = 0
            while not stop.is_set():
                key = f"load/{number:06d}"
                if client.put(f"/v1/kv/{key}", content=key.encode()).json() is True:
                    acknowledged.append(key)
                number += 1

    thread = threading.Thread(target=writer)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            assert client.put("/v1/kv/bin", content=bytes(range(256))).json() is True
            thread.start()
            # Wait until the writer is busy, so the snapshot is taken while it writes.
            deadline = time.monotonic() + 20
            while len(acknowledged) < 50:
                assert thread.is_alive() and time.monotonic() < deadline
                stop.wait(0.01)
            before = len(acknowledged)
            snap = tmp_path / "backup.snap"
            result = konsul(edge, "snapshot", "save", str(snap))
            ok(result)
            during = len(acknowledged) - before
            stop.set()
            thread.join()
            # The snapshot was taken at some commit: it holds every key acknowledged before it.
            acknowledged_before = acknowledged[:before]
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        edge.stop()
    assert during >= 0

    shown = json.loads(ok(konsul(None, "snapshot", "inspect", str(snap), "--format", "json")))
    assert shown["Site"] == "s1" and shown["Counts"]["Keys"] >= before + 1

    fresh = tmp_path / "fresh"
    restored = json.loads(ok(konsul(None, "snapshot", "restore", str(snap), "--data-dir", str(fresh), "--format", "json")))
    assert restored["RestoredReplica"] != shown["Replica"]  # a new replica id unless --same-replica
    again = EdgeProcess(fresh)
    try:
        with httpx.Client(base_url=again.url, timeout=10) as client:
            keys = set(client.get("/v1/kv/load/", params={"keys": "true"}).json())
            assert set(acknowledged_before) <= keys
            assert client.get("/v1/kv/bin", params={"raw": "true"}).content == bytes(range(256))
            assert client.get("/v1/sync/status").json()["Replica"] == restored["RestoredReplica"]
    finally:
        again.stop()


def _archive(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@pytest.fixture(scope="module")
def acl_edge(tmp_path_factory):
    edge = EdgeProcess(tmp_path_factory.mktemp("acl"), acl=True)
    with httpx.Client(base_url=edge.url, timeout=10, headers=ADMIN) as admin:
        assert admin.put("/v1/kv/app/a", content=b"1").json() is True
    yield edge
    edge.stop()


def test_snapshot_needs_a_management_token(acl_edge):
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers=ADMIN) as admin:
        policy = admin.put("/v1/acl/policy", json={"Name": "ops-kv", "Rules": 'key_prefix "" { policy = "write" }\n'
                                                   'operator = "write"\nacl = "read"'}).json()
        token = admin.put("/v1/acl/token", json={"Policies": [{"ID": policy["ID"]}]}).json()["SecretID"]
        saved = admin.get("/v1/snapshot")
        assert saved.status_code == 200 and int(saved.headers["X-Consul-Index"]) > 0
        assert saved.headers["Content-Type"].startswith("application/gzip")
        with tarfile.open(fileobj=io.BytesIO(saved.content), mode="r:gz") as tar:
            assert tar.getnames()[:3] == ["meta.json", "SHA256SUMS", "state/konsul.db"]
    for headers in ({}, {"X-Consul-Token": token}):
        with httpx.Client(base_url=acl_edge.url, timeout=10, headers=headers) as client:
            for response in (client.get("/v1/snapshot"), client.put("/v1/snapshot", content=saved.content)):
                assert response.status_code == 403, response.text
                assert response.json()["error"] == "permission_denied"


def test_restore_refused_on_a_running_edge_with_data_and_corrupt_refused(acl_edge, tmp_path):
    with httpx.Client(base_url=acl_edge.url, timeout=10, headers=ADMIN) as admin:
        good = admin.get("/v1/snapshot").content
        refused = admin.put("/v1/snapshot", content=good)
        assert refused.status_code == 409 and refused.json()["error"] == "has_data"
        for bad in (good[: len(good) // 2], b"not a snapshot", gzip.compress(b"x" * 100),
                    _archive({"meta.json": b'{"Format": "consul"}', "state/konsul.db": b"x"})):
            response = admin.put("/v1/snapshot", content=bad, params={"force": "true"})
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "invalid_snapshot"
        assert admin.get("/v1/kv/app/a", params={"raw": "true"}).content == b"1"
    assert not (acl_edge.data_dir / "restore-pending.tar.gz").exists()
    # Offline: a truncated file is refused and the target directory keeps its data.
    truncated = tmp_path / "cut.snap"
    truncated.write_bytes(good[:-200])
    target = tmp_path / "target"
    result = konsul(None, "snapshot", "restore", str(truncated), "--data-dir", str(target))
    assert result.returncode == 1 and b"invalid_snapshot" in result.stderr
    assert not (target / "konsul.db").exists()
    # And a running edge's directory is locked against an offline restore.
    whole = tmp_path / "whole.snap"
    whole.write_bytes(good)
    result = konsul(None, "snapshot", "restore", str(whole), "--data-dir", str(acl_edge.data_dir), "--force")
    assert result.returncode == 1 and b"in use" in result.stderr


def test_http_restore_on_a_fresh_edge_is_loaded_at_its_next_start(tmp_path):
    source = EdgeProcess(tmp_path / "a")
    try:
        with httpx.Client(base_url=source.url, timeout=10) as client:
            assert client.put("/v1/kv/cfg/x", content=b"42", params={"flags": "7"}).json() is True
            snap = client.get("/v1/snapshot").content
    finally:
        source.stop()
    fresh = EdgeProcess(tmp_path / "b")
    try:
        with httpx.Client(base_url=fresh.url, timeout=10) as client:
            staged = client.put("/v1/snapshot", content=snap)
            assert staged.status_code == 200 and staged.json()["Staged"] is True
    finally:
        fresh.stop()
    fresh = EdgeProcess(tmp_path / "b")
    try:
        with httpx.Client(base_url=fresh.url, timeout=10) as client:
            entry = client.get("/v1/kv/cfg/x").json()[0]
            assert base64.b64decode(entry["Value"]) == b"42" and entry["Flags"] == 7
    finally:
        fresh.stop()


def test_snapshot_inspect_shows_what_is_inside(tmp_path):
    edge = EdgeProcess(tmp_path / "d", site="plant-3")
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            for number in range(3):
                assert client.put(f"/v1/kv/k{number}", content=b"v").json() is True
            service = {"Name": "web", "Port": 80}
            assert client.put("/v1/agent/service/register", json=service).status_code == 200
        snap = tmp_path / "s.snap"
        ok(konsul(edge, "snapshot", "save", str(snap)))
    finally:
        edge.stop()
    text = ok(konsul(None, "snapshot", "inspect", str(snap)))
    assert "plant-3" in text and "Keys" in text and "Services" in text
    shown = json.loads(ok(konsul(None, "snapshot", "inspect", str(snap), "--format", "json")))
    assert shown["Counts"]["Keys"] == 3 and shown["Counts"]["Services"] == 1
    assert shown["Scopes"]["plant-3"]["Keys"] == 3


def test_kv_export_import_round_trip_to_another_edge(tmp_path):
    first, second = EdgeProcess(tmp_path / "one"), EdgeProcess(tmp_path / "two")
    try:
        values = {f"app/{n:03d}": bytes([n % 256]) * (n + 1) for n in range(150)}  # > 2 txn batches
        values["app/binary"] = bytes(range(256))
        with httpx.Client(base_url=first.url, timeout=10) as client:
            for key, value in values.items():
                assert client.put(f"/v1/kv/{key}", content=value, params={"flags": "3"}).json() is True
            assert client.put("/v1/kv/other/x", content=b"no").json() is True
        exported = ok(konsul(first, "kv", "export", "app/"))
        entries = json.loads(exported)
        assert len(entries) == len(values) and set(entries[0]) == {"key", "flags", "value"}
        with httpx.Client(base_url=second.url, timeout=10) as client:
            assert client.put("/v1/kv/app/000", content=b"older").json() is True  # an ordinary write, overwritten
        path = tmp_path / "export.json"
        path.write_text(exported)
        ok(konsul(second, "kv", "import", str(path)))
        assert json.loads(ok(konsul(second, "kv", "export", "app/"))) == entries
        # stdin, again: the same content
        ok(konsul(second, "kv", "import", input=exported.encode()))
        assert json.loads(ok(konsul(second, "kv", "export", "app/"))) == entries
        with httpx.Client(base_url=second.url, timeout=10) as client:
            assert client.get("/v1/kv/app/binary", params={"raw": "true"}).content == bytes(range(256))
            assert client.get("/v1/kv/other/x").status_code == 404
        bad = konsul(second, "kv", "import", input=b'[{"key": "a", "value": "***"}]')
        assert bad.returncode == 1 and b"not base64" in bad.stderr
    finally:
        first.stop()
        second.stop()


def test_a_restored_edge_gets_later_writes_back_from_the_hub(tmp_path):
    from agents import HubProcess, eventually

    hub = HubProcess(tmp_path / "hub")
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub.url)
    try:
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            assert client.put("/v1/kv/before", content=b"1").json() is True
            snap = client.get("/v1/snapshot").content
            assert client.put("/v1/kv/after", content=b"2").json() is True
        with httpx.Client(base_url=hub.url, timeout=10) as client:
            eventually(lambda: client.get("/v1/kv/after", params={"dc": "s1"}).status_code == 200, what="after at the hub")
        edge.stop()
        (tmp_path / "edge.snap").write_bytes(snap)
        ok(konsul(None, "snapshot", "restore", str(tmp_path / "edge.snap"), "--data-dir", str(tmp_path / "new")))
        edge = EdgeProcess(tmp_path / "new", hub_url=hub.url)
        with httpx.Client(base_url=edge.url, timeout=10) as client:
            assert client.get("/v1/kv/before", params={"raw": "true"}).content == b"1"
            eventually(lambda: client.get("/v1/kv/after", params={"raw": "true"}).content == b"2", what="after, from the hub")
    finally:
        edge.stop()
        hub.stop()

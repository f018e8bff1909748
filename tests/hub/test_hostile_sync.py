"""A hub and an edge as real processes, attacked over the sync WebSocket.

Each test sends what a hostile or broken peer could (raw frames through
trio-websocket, built with the real codec), then checks that the agent is
still up, answers a normal request, and lost nothing it had acknowledged.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path

import cbor2
import httpx
import pytest
import trio
from agents import EdgeProcess, HubProcess, eventually
from pycrdt import Doc, Map
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

from konsul.sync.hlc import Stamp
from konsul.sync.store import Store
from konsul.sync.wire import PROTOCOL_VERSION, encode

REPLICA = "abcdefabcdef"


def hello(site: str = "s1", scopes: list | None = None, **fields) -> bytes:
    message = {
        "t": "hello", "v": PROTOCOL_VERSION, "site": site, "replica": REPLICA, "role": "edge",
        "scopes": [site, "global"] if scopes is None else scopes, "now": int(time.time() * 1000),
    }
    return encode(message | fields)


def data(update: bytes, scope: str = "s1", collection: str = "kv", seq: int = 1, epoch: int = 1) -> bytes:
    return encode({"t": "data", "n": seq, "s": scope, "c": collection, "e": epoch, "u": update})


def versions_update(entries: dict) -> bytes:
    """A Yjs update of the map a collection keeps its versions in, as a peer could make it."""
    doc = Doc()
    versions = doc.get("versions", type=Map)
    for name, value in entries.items():
        versions[name] = value
    return doc.get_update()


def vid(key: str, stamp: Stamp) -> str:
    return f"{key}\x00{stamp.encode()}"


def talk(url: str, frames: list[bytes | str], until=None, timeout: float = 10.0) -> tuple[list, bool]:
    """Send ``frames`` on a fresh sync connection; collect what comes back.

    Returns the decoded messages and whether the hub closed the connection.
    Stops as soon as ``until(messages)`` holds, or the connection closes.
    """
    ws_url = url.replace("http://", "ws://") + "/v1/sync"
    received: list = []

    async def run() -> bool:
        with trio.fail_after(timeout):
            async with open_websocket_url(ws_url, max_message_size=64 * 1024 * 1024) as ws:
                try:
                    for frame in frames:
                        await ws.send_message(frame)
                    while until is None or not until(received):
                        message = await ws.get_message()
                        received.append(cbor2.loads(message) if isinstance(message, bytes) else message)
                except ConnectionClosed:
                    return True
                return False

    closed = trio.run(run)
    return received, closed


def error_codes(messages: list) -> list[str]:
    return [m["code"] for m in messages if isinstance(m, dict) and m.get("t") == "error"]


def kv_raw(url: str, key: str, dc: str | None = None) -> bytes | None:
    response = httpx.get(f"{url}/v1/kv/{key}", params={"raw": ""} | ({"dc": dc} if dc else {}))
    return response.content if response.status_code == 200 else None


def assert_up(agent) -> None:
    """The agent still runs and answers a normal request."""
    assert agent.proc.poll() is None, agent.output
    httpx.get(f"{agent.url}/v1/status/leader", timeout=5).raise_for_status()


def scope_dirs(hub: HubProcess) -> set[str]:
    root = Path(hub.data_dir) / "scopes"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


# -- finding 4: scopes from a hello ------------------------------------------------


def test_a_refused_hello_creates_no_scope_and_junk_scope_dirs_do_not_stop_a_restart(tmp_path):
    port = _port()
    hub = HubProcess(tmp_path / "hub", port)
    try:
        httpx.put(f"{hub.url}/v1/kv/kept?dc=global", content=b"before").raise_for_status()
        # 3,500 scopes in one hello: refused as a whole, nothing created.
        many = [f"junk{i}" for i in range(3500)]
        messages, closed = talk(hub.url, [hello("junk0", many)])
        assert error_codes(messages) == ["too_many_scopes"] and closed
        # Names that are not scope names (a path, an empty name, a number): refused.
        for scopes in (["s1", "../escape"], ["s1", ""], ["s1", 7], ["s1", "s1"]):
            messages, closed = talk(hub.url, [hello("s1", scopes)])
            assert error_codes(messages) == ["malformed"], scopes
        # A well-formed hello refused for another reason creates nothing either.
        messages, _ = talk(hub.url, [hello("s9", role="hub")])
        assert error_codes(messages) == ["role_mismatch"]
        assert scope_dirs(hub) == {"global"}
        assert_up(hub)
        assert 'konsul_sync_refused_total{reason="too_many_scopes"} 1.0' in httpx.get(f"{hub.url}/metrics").text
    finally:
        hub.stop()

    # What older versions left behind for refused hellos: many scope stores
    # with nothing in them, a directory without a database, a stray name.
    scopes = Path(tmp_path / "hub" / "scopes")
    for i in range(300):
        Store.open(scopes / f"old{i}").close()
    (scopes / "nodb").mkdir()
    (scopes / "..bad name").mkdir()
    hub = HubProcess(tmp_path / "hub", port)
    try:
        hub.wait_for(r"skipped 301 scope directories")
        assert kv_raw(hub.url, "kept", "global") == b"before"
        # A real site connects (and its scope is created) after the restart.
        edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=hub.url)
        try:
            httpx.put(f"{edge.url}/v1/kv/site-key", content=b"v").raise_for_status()
            eventually(lambda: kv_raw(hub.url, "site-key", "s1") == b"v", what="the site's write at the hub")
        finally:
            edge.stop()
    finally:
        hub.stop()
    # The site's scope holds state now: it opens on the next start.
    hub = HubProcess(tmp_path / "hub", port)
    try:
        assert kv_raw(hub.url, "site-key", "s1") == b"v"
    finally:
        hub.stop()


def test_a_damaged_database_of_a_real_scope_still_stops_start_up(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    try:
        httpx.put(f"{hub.url}/v1/kv/k?dc=global", content=b"v").raise_for_status()
    finally:
        hub.stop()
    database = tmp_path / "hub" / "scopes" / "global" / "konsul.db"
    database.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AssertionError, match="left untouched"):
        HubProcess(tmp_path / "hub")


# -- finding 5: a clock far ahead --------------------------------------------------


def test_a_peer_stamping_the_year_6429_does_not_drag_the_hub_clock(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    try:
        future = Stamp(int(time.mktime((6429, 1, 1, 0, 0, 0, 0, 0, 0)) * 1000), 0, REPLICA)
        update = versions_update({vid("future", future): b"\x00from the future"})

        def acked(messages):
            return any(m.get("t") == "ack" for m in messages)

        messages, _ = talk(hub.url, [hello(), data(update)], until=acked)
        assert acked(messages), messages
        # The peer's version is kept: nothing it was told is stored is lost.
        assert kv_raw(hub.url, "future", "s1") == b"from the future"
        # A later write at the hub carries the hub's own time, not 6429.
        httpx.put(f"{hub.url}/v1/kv/later?dc=s1", content=b"now").raise_for_status()
        [later] = httpx.get(f"{hub.url}/v1/kv/later", params={"history": "", "dc": "s1"}).json()
        assert Stamp.decode(later["Stamp"]).wall_ms <= (time.time() + 300 + 60) * 1000, later
        # A write that has seen the future version replaces it, as any later write does.
        httpx.put(f"{hub.url}/v1/kv/future?dc=s1", content=b"replaced").raise_for_status()
        assert kv_raw(hub.url, "future", "s1") == b"replaced"
        assert "konsul_clock_skewed_stamps_total 1.0" in httpx.get(f"{hub.url}/metrics").text
        assert_up(hub)
    finally:
        hub.stop()
    # Nor does loading the stored version drag the clock at the next start.
    hub = HubProcess(tmp_path / "hub")
    try:
        httpx.put(f"{hub.url}/v1/kv/after-restart?dc=s1", content=b"x").raise_for_status()
        [entry] = httpx.get(f"{hub.url}/v1/kv/after-restart", params={"history": "", "dc": "s1"}).json()
        assert Stamp.decode(entry["Stamp"]).wall_ms <= (time.time() + 300 + 60) * 1000, entry
    finally:
        hub.stop()


# -- findings 2 (sync side), 7 and others: junk frames ------------------------------

_NOW = Stamp(int(time.time() * 1000), 0, REPLICA)

JUNK_FRAMES = {
    "random bytes": [os.urandom(64)],
    "cbor of the wrong shape": [cbor2.dumps([1, 2, 3])],
    "unknown message type": [encode({"t": "launch"})],
    "nested 100,000 levels": [b"\x81" * 100_000 + b"\x00"],
    "a map of a million empty maps": [b"\xba\x00\x10\x00\x00" + b"\x00\xa0" * 0x100000],
    "a tag": [cbor2.dumps(cbor2.CBORTag(1, 2**70))],
    "text frame": ["hello?"],
    "data before hello": [data(b"\x00\x00")],
    "a garbage update": [hello(), data(os.urandom(200))],
    "an update pycrdt refuses": [hello(), data(b"\x01\x01\xff\xff\xff\xff\x0f\x00")],
    "a version holding a string": [hello(), data(versions_update({vid("k", _NOW): "not bytes"}))],
    "a version holding a huge number": [hello(), data(versions_update({vid("k", _NOW): 2**40}))],
    "a version holding a nested type": [hello(), data(versions_update({vid("k", _NOW): {"a": [1]}}))],
    "a version id without a stamp": [hello(), data(versions_update({"no-stamp": b"\x00v"}))],
    "a kv payload that is not CBOR": [hello(), data(versions_update({vid("k", _NOW): b"\x83\xff\xff"}))],
    "a twin value nested 900 levels": [
        hello(), data(versions_update({vid("t/d1/desired/x", _NOW): b"\x81" * 900 + b"\x00"}), collection="devices"),
    ],
    "an unknown collection": [hello(), data(versions_update({vid("k", _NOW): b"\x00v"}), collection="zz")],
    "a garbage state vector": [hello(), encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\xff" * 20})],
    "an epoch beyond 64 bits": [hello(), data(b"\x00\x00", epoch=2**70)],
    "a scope outside the session": [hello(), data(b"\x00\x00", scope="other")],
}


def test_junk_sync_frames_end_their_session_only(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=hub.url)
    try:
        eventually(lambda: _connected(hub) == {"s1"}, what="the edge connected")
        httpx.put(f"{edge.url}/v1/kv/acknowledged", content=b"before").raise_for_status()
        eventually(lambda: kv_raw(hub.url, "acknowledged", "s1") == b"before", what="the write at the hub")
        lines_before = len(hub.lines)
        for name, frames in JUNK_FRAMES.items():
            messages, closed = talk(hub.url, frames)
            assert closed, name
            if name != "text frame":
                assert error_codes(messages), (name, messages)
            assert_up(hub)
        # Junk from one source logs a few lines, never a traceback per frame.
        logged = hub.lines[lines_before:]
        assert not [line for line in logged if "Traceback" in line], "".join(logged)
        assert len(logged) <= 12, "".join(logged)
        # Nothing acknowledged is lost, and the real edge kept syncing both ways.
        assert kv_raw(hub.url, "acknowledged", "s1") == b"before"
        assert kv_raw(hub.url, "k", "s1") is None
        httpx.put(f"{edge.url}/v1/kv/after", content=b"x").raise_for_status()
        eventually(lambda: kv_raw(hub.url, "after", "s1") == b"x", what="a later edge write at the hub")
        httpx.put(f"{hub.url}/v1/kv/down?dc=s1", content=b"y").raise_for_status()
        eventually(lambda: kv_raw(edge.url, "down") == b"y", what="a hub write at the edge")
        assert 'konsul_sync_refused_total{reason="bad_update"}' in httpx.get(f"{hub.url}/metrics").text
    finally:
        edge.stop()
        hub.stop()


def test_a_hostile_hub_answer_ends_the_session_not_the_edge(tmp_path):
    """A fake hub says hello properly, then sends junk; the edge keeps serving and retries."""
    answers = [
        encode({"t": "snap", "n": 1, "s": "s1", "c": "kv", "e": 7, "u": os.urandom(300)}),
        encode({"t": "data", "n": 2, "s": "s1", "c": "kv", "e": 1,
                "u": versions_update({vid("k", _NOW): 2**40})}),
        b"\x81" * 100_000 + b"\x00",
        encode({"t": "eph", "s": "s1", "k": "telemetry-ack", "d": {"b": "x" * 10}}),
    ]
    sessions = []
    server = _FakeHub(answers, sessions)
    server.start()
    edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=f"http://127.0.0.1:{server.port}")
    try:
        httpx.put(f"{edge.url}/v1/kv/local", content=b"v").raise_for_status()
        # Each of the first three answers ends its session; the edge reconnects.
        # The last (a malformed telemetry acknowledgement) is ignored.
        eventually(lambda: len(sessions) >= len(answers), what="the edge reconnecting after each junk answer")
        eventually(lambda: httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"][0]["Connected"],
                   what="the edge in sync with the last session")
        assert_up(edge)
        assert kv_raw(edge.url, "local") == b"v"
        assert "Traceback" not in edge.output, edge.output
    finally:
        edge.stop()
        server.stop()


class _FakeHub:
    """A sync server in a thread: answers each connection's hello, then sends the next junk frame."""

    def __init__(self, answers: list[bytes], sessions: list) -> None:
        self.answers = answers
        self.sessions = sessions
        self.port = 0
        self._ready = threading.Event()
        self._stop: trio.CancelScope | None = None
        self._token = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        if self._token is not None:
            self._token.run_sync_soon(self._stop.cancel)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._stop:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0, None)
                self.port = server.port
                self._ready.set()

    async def _handle(self, request) -> None:
        ws = await request.accept()
        turn = len(self.sessions)
        self.sessions.append(turn)
        try:
            first = cbor2.loads(await ws.get_message())
            await ws.send_message(encode({
                "t": "hello", "v": PROTOCOL_VERSION, "site": "hub", "replica": "fakefakefake",
                "role": "hub", "scopes": first["scopes"], "now": int(time.time() * 1000),
            }))
            await ws.send_message(self.answers[turn % len(self.answers)])
            while True:
                await ws.get_message()
        except ConnectionClosed:
            pass


# -- finding 6: telemetry ------------------------------------------------------------


def test_telemetry_samples_the_hub_cannot_read_are_refused_and_listings_never_fail(tmp_path):
    hub = HubProcess(tmp_path / "hub", extra=["--acl", "off"])
    try:
        good = cbor2.dumps({"t": 21.5})
        rows = [
            ["d1", 1, 1_700_000_000_000, good],
            ["d1", 2, 1_700_000_001_000, b"\xff\x00 not cbor"],
            ["d1", 3, 1_700_000_002_000, b"\x81" * 900 + b"\x00"],
            ["d1", 4, 1_700_000_003_000, cbor2.dumps([1, 2])],  # not a map
            ["d1", "five", 1_700_000_004_000, good],  # a malformed row
        ]
        batch = encode({"t": "eph", "s": "s1", "k": "telemetry", "d": {"b": 42, "x": rows}})

        def acked(messages):
            return any(m.get("k") == "telemetry-ack" for m in messages)

        # Samples are stored only for devices of the session's site the hub knows.
        messages, _ = talk(hub.url, [hello(), batch], until=acked)
        [ack] = [m["d"] for m in messages if m.get("k") == "telemetry-ack"]
        assert ack == {"b": 42, "ok": False, "refused": 0}  # not yet: the edge sends it again
        httpx.put(f"{hub.url}/v1/devices/d1", params={"dc": "s1"}, json={"Type": "sensor"}).raise_for_status()
        messages, _ = talk(hub.url, [hello(), batch], until=acked)
        [ack] = [m["d"] for m in messages if m.get("k") == "telemetry-ack"]
        assert ack == {"b": 42, "ok": True, "refused": 4}  # acknowledged: the edge deletes them
        listing = httpx.get(f"{hub.url}/v1/devices/d1/telemetry", params={"dc": "s1"})
        assert listing.status_code == 200, listing.text
        assert [s["Data"] for s in listing.json()] == [{"t": 21.5}]
        assert 'konsul_telemetry_refused_total{reason="unreadable"} 4.0' in httpx.get(f"{hub.url}/metrics").text
    finally:
        hub.stop()
    # A bad row already stored (by an older version) shows as undecodable.
    db = sqlite3.connect(tmp_path / "hub" / "telemetry.db")
    with db:
        db.execute("INSERT INTO samples VALUES ('s1', 'd1', 9, 1700000009000, 0, x'ff00')")
    db.close()
    hub = HubProcess(tmp_path / "hub", extra=["--acl", "off"])
    try:
        listing = httpx.get(f"{hub.url}/v1/devices/d1/telemetry", params={"dc": "s1"})
        assert listing.status_code == 200, listing.text
        bad = [s for s in listing.json() if s["Seq"] == 9]
        assert bad and bad[0]["Data"] is None and "Undecodable" in bad[0]
    finally:
        hub.stop()


# -- finding 7: file permissions -------------------------------------------------------


def test_data_directories_are_private(tmp_path):
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir(mode=0o755)
    os.chmod(hub_dir, 0o755)  # an existing directory, as older versions left it
    hub = HubProcess(hub_dir)
    edge = EdgeProcess(tmp_path / "e1", site="s1", hub_url=hub.url)
    try:
        eventually(lambda: _connected(hub) == {"s1"}, what="the edge connected")
        httpx.put(f"{edge.url}/v1/kv/k", content=b"v").raise_for_status()
        eventually(lambda: kv_raw(hub.url, "k", "s1") == b"v", what="the write at the hub")
        for root in (hub_dir, tmp_path / "e1"):
            for path in [root, *root.rglob("*")]:
                mode = stat.S_IMODE(path.stat().st_mode)
                if path.is_dir():
                    assert mode == 0o700, (path, oct(mode))
                else:
                    assert mode & 0o077 == 0, (path, oct(mode))
    finally:
        edge.stop()
        hub.stop()


def _connected(hub: HubProcess) -> set[str]:
    return {s["Site"] for s in httpx.get(f"{hub.url}/v1/sites").json() if s["Connected"]}


def _port() -> int:
    from agents import free_port

    return free_port()

"""A restored edge keeps serving its OSCORE devices, and replays from before the restore stay refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aiocoap.numbers.codes import Code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import MANAGEMENT_TOKEN, free_port, free_udp_port  # noqa: E402
from test_coap_aiocoap import request  # noqa: E402
from test_coap_oscore import TEXT, OscoreEdge, exchange, oscore, protected_datagram, save_context  # noqa: E402


def konsul(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "konsul.cli", *args], capture_output=True, timeout=60)


def test_an_oscore_device_talks_to_the_restored_edge(tmp_path):
    ports = ["--http-addr", f"127.0.0.1:{free_port()}", "--coap-addr", f"127.0.0.1:{free_udp_port()}"]
    edge = OscoreEdge(tmp_path / "original", extra=ports)
    try:
        device = edge.provision("osc-snap", {"KVWrite": ["snap/"]})
        context_dir = save_context(tmp_path / "ctx", device)
        put = oscore(edge, context_dir, lambda c: request(c, Code.PUT, f"{edge.coap}/kv/snap/v", b"1", content_format=TEXT))
        assert put.code == Code.CREATED
        snap = tmp_path / "edge.snap"
        saved = konsul("snapshot", "save", str(snap), "--http-addr", edge.addr, "--token", MANAGEMENT_TOKEN)
        assert saved.returncode == 0, saved.stderr
        # After the snapshot the original edge sees a request an attacker captures.
        captured = protected_datagram(context_dir, Code.PUT, ("kv", "snap", "v"), b"captured")
        assert exchange(edge, captured, 50).code == Code.CHANGED
    finally:
        edge.stop()

    fresh = tmp_path / "restored"
    restored = konsul("snapshot", "restore", str(snap), "--data-dir", str(fresh))
    assert restored.returncode == 0, restored.stderr
    edge = OscoreEdge(fresh, extra=ports)
    try:
        # The restored edge cannot know the window from after the snapshot: it asks for an
        # Echo (RFC 8613 B.1.2) instead of acting on the replay.
        replayed = exchange(edge, captured, 51)
        assert replayed.opt.oscore is not None  # the 4.01 Echo goes inside the protection
        assert edge.metric('konsul_coap_refused_total{reason="oscore_echo"}') == 1
        assert edge.kv("snap/v") == b"1"
        # The device itself answers the Echo and goes on with the same context.
        put = oscore(edge, context_dir, lambda c: request(c, Code.PUT, f"{edge.coap}/kv/snap/v", b"2", content_format=TEXT))
        assert put.code == Code.CHANGED, put.payload
        assert edge.kv("snap/v") == b"2"
        assert exchange(edge, captured, 52).code == Code.UNAUTHORIZED
    finally:
        edge.stop()

"""libcoap's ``coap-client`` against a real ``konsul edge``, used as a device owner would.

Discovery, resource-directory registration and removal, KV in text and CBOR,
Observe while the HTTP API changes the key, a 100 KiB value block-wise both
ways, and the bad-input cases (each a 4.xx with a diagnostic that changes
nothing).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cbor2
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

from agents import EdgeProcess

COAP_CLIENT = shutil.which("coap-client") or shutil.which("coap-client-notls")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    if COAP_CLIENT is None:
        pytest.fail("libcoap's coap-client is missing: run scripts/setup (Debian package libcoap3-bin)")
    process = EdgeProcess(
        tmp_path_factory.mktemp("coap-edge"), extra=["--acl", "off", "--coap-addr", "127.0.0.1:0", "--allow-anonymous"]
    )
    host, port = process.coap_addr()
    process.coap = f"coap://{host}:{port}"
    yield process
    process.stop()


@pytest.fixture(scope="module")
def writer(edge):
    """A device allowed to write ``cfg/`` and ``big/``: (id, token)."""
    reply = httpx.put(f"{edge.url}/v1/devices/writer", json={"KVWrite": ["cfg/", "big/"]})
    assert reply.status_code == 201, reply.text
    return "writer", reply.json()["Token"]


def coap(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    """One coap-client run; its stdout is the payload, errors go to stderr."""
    return subprocess.run([COAP_CLIENT, "-B", "10", *args], check=False, capture_output=True, timeout=timeout)


def printed(done: subprocess.CompletedProcess[bytes]) -> bytes:
    """What coap-client printed, without the newline it ends its output with."""
    return done.stdout.removesuffix(b"\n")


def http_raw(edge, key: str) -> httpx.Response:
    return httpx.get(f"{edge.url}/v1/kv/{key}?raw")


def test_discovery_lists_every_resource(edge):
    done = coap("-m", "get", f"{edge.coap}/.well-known/core")
    listing = done.stdout.decode()
    for link in ("</kv/>", '</rd>;rt="core.rd"', "</rd-lookup/ep>", "</rd-lookup/res>", "</devices/>"):
        assert link in listing
    # RFC 9176 discovery of the directory by resource type
    done = coap("-m", "get", f"{edge.coap}/.well-known/core?rt=core.rd*")
    assert "</rd>" in done.stdout.decode() and "</kv/>" not in done.stdout.decode()


def test_register_look_up_and_remove(edge):
    done = coap(
        "-m", "post", "-t", "40", "-e", '</temp>;rt="temperature";ct=0',
        f"{edge.coap}/rd?ep=sensor-7&lt=300&et=thermometer",
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    device = httpx.get(f"{edge.url}/v1/devices/sensor-7").json()
    assert device["Online"] and device["Protocol"] == "coap"

    found = coap("-m", "get", f"{edge.coap}/rd-lookup/ep?ep=sensor-7").stdout.decode()
    location = re.match(r"<(/rd/[0-9a-f]+)>", found).group(1)
    assert 'ep="sensor-7"' in found and 'et="thermometer"' in found and 'lt="300"' in found
    resources = coap("-m", "get", f"{edge.coap}/rd-lookup/res?rt=temp*").stdout.decode()
    assert re.search(r'<coap://127\.0\.0\.1:\d+/temp>;rt="temperature";ct="0";anchor="coap://', resources)

    done = coap("-m", "delete", f"{edge.coap}{location}")
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert printed(coap("-m", "get", f"{edge.coap}/rd-lookup/ep?ep=sensor-7")) == b""
    assert httpx.get(f"{edge.url}/v1/devices/sensor-7").json()["Online"] is False


def test_put_and_get_text(edge, writer):
    device, token = writer
    auth = f"ep={device}&tk={token}"
    done = coap("-m", "put", "-t", "0", "-e", "hello coap", f"{edge.coap}/kv/cfg/greeting?{auth}")
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert http_raw(edge, "cfg/greeting").content == b"hello coap"
    done = coap("-m", "get", "-A", "0", f"{edge.coap}/kv/cfg/greeting")
    assert printed(done) == b"hello coap"


def test_put_and_get_cbor(edge, writer, tmp_path):
    device, token = writer
    payload = tmp_path / "value.cbor"
    payload.write_bytes(cbor2.dumps(b"\x00\x01binary\xff"))
    done = coap("-m", "put", "-t", "60", "-f", str(payload), f"{edge.coap}/kv/cfg/blob?ep={device}&tk={token}")
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert http_raw(edge, "cfg/blob").content == b"\x00\x01binary\xff"
    # CBOR is the default: no Accept, answered as a CBOR byte string
    answer = tmp_path / "answer.cbor"
    coap("-m", "get", "-o", str(answer), f"{edge.coap}/kv/cfg/blob")
    assert cbor2.loads(answer.read_bytes()) == b"\x00\x01binary\xff"


def test_observe_follows_http_changes(edge):
    httpx.put(f"{edge.url}/v1/kv/watched", content=b"v0")
    observer = subprocess.Popen(
        [COAP_CLIENT, "-s", "30", "-w", "-A", "0", "-m", "get", f"{edge.coap}/kv/watched"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in observer.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=10) == b"v0\n"
        for value in (b"v1", b"v2"):
            httpx.put(f"{edge.url}/v1/kv/watched", content=value)
            assert lines.get(timeout=10) == value + b"\n"
    finally:
        observer.terminate()
        observer.wait(10)


def test_100k_value_travels_blockwise_both_ways(edge, writer, tmp_path):
    device, token = writer
    value = os.urandom(100 * 1024)
    upload = tmp_path / "up.bin"
    upload.write_bytes(value)
    done = coap(
        "-m", "put", "-t", "42", "-b", "1024", "-f", str(upload), f"{edge.coap}/kv/big/up?ep={device}&tk={token}"
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert http_raw(edge, "big/up").content == value

    value = os.urandom(100 * 1024)
    httpx.put(f"{edge.url}/v1/kv/big/down", content=value)
    download = tmp_path / "down.bin"
    coap("-m", "get", "-A", "42", "-o", str(download), f"{edge.coap}/kv/big/down")
    assert download.read_bytes() == value


def refused(done: subprocess.CompletedProcess[bytes], code: str, short: str) -> None:
    """coap-client prints an error response as '<code> <diagnostic>' on stderr."""
    assert done.stderr.decode().startswith(f"{code} {short}: "), done.stderr


def test_bad_input_is_refused_with_a_diagnostic_and_changes_nothing(edge, writer, tmp_path):
    device, token = writer
    auth = f"ep={device}&tk={token}"
    httpx.put(f"{edge.url}/v1/kv/cfg/kept", content=b"original")
    target = f"{edge.coap}/kv/cfg/kept?{auth}"

    refused(coap("-m", "put", "-t", "60", "-e", "%ff%00", target), "4.00", "malformed_cbor")
    refused(coap("-m", "put", "-t", "40", "-e", "</x>", target), "4.15", "unsupported_content_format")
    refused(coap("-m", "get", "-A", "40", target), "4.06", "not_acceptable")
    refused(coap("-m", "get", f"{edge.coap}/nowhere"), "4.04", "not_found")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (300 * 1024))
    refused(coap("-m", "put", "-t", "42", "-b", "1024", "-f", str(big), target), "4.13", "payload_too_large")
    refused(coap("-m", "post", f"{edge.coap}/rd?lt=60"), "4.00", "missing_endpoint")

    assert http_raw(edge, "cfg/kept").content == b"original"
    assert printed(coap("-m", "get", f"{edge.coap}/rd-lookup/ep")) == b""

"""The hub's /v1/sync WebSocket as the HTTP app serves it: close codes, refusals in the JSON
error form, a peer that leaves, and the routing answers around it."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from agents import HubProcess


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    process = HubProcess(tmp_path_factory.mktemp("hub"))
    yield process
    process.stop()


def ws_url(hub: HubProcess, path: str = "/v1/sync") -> str:
    return hub.url.replace("http://", "ws://") + path


def closed_with(hub: HubProcess, send) -> tuple[int, str]:
    """The close code and reason the hub ends a connection with after ``send(ws)``."""
    async def run() -> tuple[int, str]:
        with trio.fail_after(10):
            async with open_websocket_url(ws_url(hub)) as ws:
                await send(ws)
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as closed:
                    return closed.reason.code, closed.reason.reason or ""
        raise AssertionError("not closed")

    return trio.run(run)


def refusals(hub: HubProcess, reason: str) -> float:
    for line in httpx.get(f"{hub.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'konsul_sync_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_text_frame_is_closed_with_1003_and_counted(hub):
    code, reason = closed_with(hub, lambda ws: ws.send_message("hello in text"))
    assert code == 1003 and "binary" in reason
    assert refusals(hub, "text_frame") >= 1


def test_a_peer_that_leaves_ends_its_session_only(hub):
    async def leave() -> None:
        async with open_websocket_url(ws_url(hub)) as ws:
            await ws.send_message(b"\xa0")  # an empty CBOR map: not a hello
            await ws.aclose()

    trio.run(leave)
    # The hub serves on, and an abrupt leave is not counted as an internal failure.
    assert httpx.get(f"{hub.url}/v1/sites", timeout=5).status_code == 200
    assert refusals(hub, "internal") == 0


def test_a_handshake_to_an_unknown_path_is_a_404_in_the_error_form(hub):
    async def run() -> None:
        async with open_websocket_url(ws_url(hub, "/v1/nowhere")):
            pass

    with pytest.raises(ConnectionRejected) as rejected:
        trio.run(run)
    assert rejected.value.status_code == 404
    assert json.loads(rejected.value.body)["error"] == "unknown_endpoint"


def test_routing_answers_around_the_socket(hub):
    with httpx.Client(base_url=hub.url, timeout=5) as http:
        wrong = http.post("/v1/sites")
        assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
        assert wrong.headers["allow"] == "GET, HEAD, OPTIONS"
        options = http.options("/v1/kv/a")
        assert options.status_code == 200 and options.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"
        head = http.head("/v1/sites")
        assert head.status_code == 200 and head.content == b""
        # A plain GET of the socket's path is told to open a WebSocket.
        plain = http.get("/v1/sync")
        assert plain.status_code == 400 and "WebSocket handshake" in plain.json()["detail"]
        # Any token is a method to HTTP: made-up ones count together, not as a label each.
        assert http.request("BREW", "/v1/sites").status_code == 405
        metrics = http.get("/metrics").text
        assert 'konsul_http_requests_total{method="other",status="405"}' in metrics and "BREW" not in metrics

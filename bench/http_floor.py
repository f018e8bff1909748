"""Do-nothing HTTP servers on trio: what an HTTP layer costs before konsul does anything.

    .venv/bin/python bench/http_floor.py VARIANT PORT

Every variant answers any request (reading its body) with ``200`` and the
body ``true``, on 127.0.0.1:PORT, keep-alive, until killed. ``bench/http_kv.py
--floors`` drives each with the same wrk PUT workload as konsul and reports
req/s and server CPU per request. The variants, from leanest to konsul's stack:

- ``raw``: a hand-written HTTP/1.1 reader (find the blank line, read
  Content-Length bytes) on trio streams: about the least Python can do;
- ``h11``: the h11 state machine on trio streams, no ASGI;
- ``asgi``: hypercorn's trio worker with a bare ASGI app (no framework);
- ``quart``: quart-trio on hypercorn with one route, as konsul's HTTP API ran
  until konsul drove hypercorn's protocol core with its own trio adapter;
- ``lean``: the bare ASGI app on hypercorn's protocol core driven by konsul's
  adapter (``konsul.protocols.http.server``);
- ``lean-quart``: the one-route quart-trio app on that adapter.

konsul no longer depends on quart-trio (its app is its own,
``konsul.protocols.http.app``): the two quart variants run only where it is
installed (``.venv/bin/pip install quart-trio``); ``http_kv.py --floors``
skips them otherwise.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

BODY = b"true"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n" + BODY


async def raw_handler(stream: trio.SocketStream) -> None:
    buffer = b""
    try:
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                continue
            length = 0
            for line in buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < end + 4 + length:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            buffer = buffer[end + 4 + length:]
            await stream.send_all(RESPONSE)
    except trio.BrokenResourceError:
        return


async def h11_handler(stream: trio.SocketStream) -> None:
    import h11

    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if isinstance(event, h11.EndOfMessage):
                out = conn.send(h11.Response(
                    status_code=200, headers=[("content-type", "application/json"), ("content-length", "4")]
                ))
                out += conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError):
        return


async def asgi_app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    await send({
        "type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"4")],
    })
    await send({"type": "http.response.body", "body": BODY})


def quart_app():
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.route("/<path:key>", methods=["GET", "PUT", "POST"])
    async def any_key(key: str) -> Response:
        await request.get_data(cache=False)
        return Response(BODY, content_type="application/json")

    return app


def main() -> None:
    variant, port = sys.argv[1], int(sys.argv[2])
    if variant in ("raw", "h11"):
        handler = raw_handler if variant == "raw" else h11_handler
        trio.run(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
        return
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    app = asgi_app if variant in ("asgi", "lean") else quart_app()
    if variant.startswith("lean"):
        from konsul.protocols.http.server import serve
    else:
        from hypercorn.trio import serve
    trio.run(partial(serve, app, config))


if __name__ == "__main__":
    main()

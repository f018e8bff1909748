"""Serving an app with hypercorn under trio, the same way for the edge and the hub."""

from __future__ import annotations

import logging
from functools import partial

import trio

from konsul.sync.wire import MAX_FRAME_BYTES


async def serve_app(app, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the URL it bound (port 0 resolved)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    # A logger object, not "-": hypercorn then adds no handler of its own and
    # our logging configuration decides (no duplicated start-up lines).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    # A sync diff or snapshot travels as one WebSocket message; hypercorn's
    # default (16 MiB) would cut a large reconciliation short.
    config.websocket_max_message_size = MAX_FRAME_BYTES
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
        task_status.started(binds[0])

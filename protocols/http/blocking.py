"""Consul blocking queries: ``?index=N&wait=D`` and ``X-Consul-Index``.

A query whose ``index`` is below the resource's current index answers at once.
Otherwise it waits until the resource changes or ``wait`` passes (default 5
minutes, at most 10, plus a little jitter as Consul adds, so that many watchers
do not wake together), then answers with whatever is current. Clients must
treat a wake-up without change as normal, exactly as with Consul.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from .params import duration_arg, int_arg
from .request import current_request

DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0


async def block_until_changed(current_index: Callable[[], int], event: Callable[[], trio.Event]) -> None:
    """Wait as the request's ``index``/``wait`` ask; returns at once without ``index``."""
    args = current_request().args
    if "index" not in args and "wait" not in args:
        return  # most requests: not a blocking query
    wanted = int_arg("index")
    wait = duration_arg("wait")  # parsed even without index, so a bad value is an error
    if not wanted:
        return
    wait = min(wait if wait is not None else DEFAULT_WAIT_S, MAX_WAIT_S)
    wait += random.uniform(0, wait / 16)
    # An index above ours means the client saw another replica or we restarted:
    # answer at once so it resets, as Consul does when an index goes backwards.
    with trio.move_on_after(wait):
        while reported_index(current_index()) == wanted:
            await event().wait()


def reported_index(value: int) -> int:
    """The index a client sees: never 0, which Consul clients read as "none" (first change is 2)."""
    return max(1, value)


def index_header(value: int) -> dict[str, str]:
    return {"X-Consul-Index": str(reported_index(value))}

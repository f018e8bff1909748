from __future__ import annotations

import pytest
import trio
from sync_support import WallClock, serve

from konsul.sync.replica import Replica


@pytest.fixture
async def open_replica(tmp_path):
    """Open and run a replica in ``tmp_path/<name>``; it is closed after the test.

    Each replica gets its own :class:`WallClock` unless ``wall_ms`` is given.
    To stop one during a test, use ``sync_support.serve`` or ``running``.
    """
    async with trio.open_nursery() as nursery:

        async def open_(name: str = "replica", **kwargs) -> Replica:
            kwargs.setdefault("wall_ms", WallClock())
            replica = Replica.open(tmp_path / name, **kwargs)
            await nursery.start(serve, replica)
            return replica

        yield open_
        nursery.cancel_scope.cancel()

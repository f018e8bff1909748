"""CPython stand-in for MicroPython's ``utime`` (ticks never wrap here)."""

from __future__ import annotations

import time as _time

gmtime = _time.gmtime
localtime = _time.localtime


def time() -> int:
    return int(_time.time())


def ticks_ms() -> int:
    return int(_time.monotonic() * 1000)


def ticks_add(ticks: int, delta: int) -> int:
    return ticks + delta


def ticks_diff(later: int, earlier: int) -> int:
    return later - earlier


def sleep_ms(ms: int) -> None:
    _time.sleep(ms / 1000)


def sleep(seconds: float) -> None:
    _time.sleep(seconds)

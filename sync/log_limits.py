"""Log lines from peers' mistakes, rate-limited per source.

A peer that sends junk in a loop (a broken device, a port scanner, an
attacker) must not be able to fill the disk through the agent's log or drown
the lines that matter. Each (source, kind) pair may log a few lines per
window; the rest are counted and summed up in the next line that is let
through.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

LINES_PER_WINDOW = 5
WINDOW_S = 60.0
MAX_SOURCES = 4096  # pairs remembered; the least recently seen is forgotten first


class LogLimiter:
    """Lets through at most ``lines`` log lines per key and ``window`` seconds."""

    def __init__(self, lines: int = LINES_PER_WINDOW, window: float = WINDOW_S, clock=time.monotonic) -> None:
        self.lines = lines
        self.window = window
        self._clock = clock
        self._seen: OrderedDict[object, list] = OrderedDict()  # key -> [window start, lines, suppressed]

    def allow(self, key: object) -> tuple[bool, int]:
        """Whether to log now for ``key``, and how many lines were suppressed before."""
        now = self._clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            suppressed = 0 if entry is None else entry[2]
            self._seen[key] = [now, 1, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > MAX_SOURCES:
                self._seen.popitem(last=False)
            return True, suppressed
        self._seen.move_to_end(key)
        if entry[1] < self.lines:
            entry[1] += 1
            suppressed, entry[2] = entry[2], 0
            return True, suppressed
        entry[2] += 1
        return False, 0

    def log(self, logger: logging.Logger, level: int, key: object, msg: str, *args: object, exc_info: bool = False) -> None:
        """``logger.log(level, msg, *args)`` unless ``key`` has used up its lines."""
        allowed, suppressed = self.allow(key)
        if not allowed or not logger.isEnabledFor(level):
            return
        if suppressed:
            msg = f"{msg} ({suppressed} similar lines suppressed)"
        logger.log(level, msg, *args, exc_info=exc_info)


peer_log = LogLimiter()  # the agent's one limiter for lines caused by peers

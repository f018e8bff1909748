"""Hybrid logical clocks (Kulkarni et al., 2014).

A stamp is (wall milliseconds, counter, replica id). Stamps order every write in
the fleet: they follow wall time when clocks are sane, never go backwards on one
replica, and always exceed every stamp the replica has seen. The replica id
breaks ties, so the order is total and the same on every replica.

Bounded skew. A stamp from elsewhere moves this clock forward only as far as
``max_skew_ms`` ahead of this replica's wall clock. A peer whose clock is in
the year 6429 would otherwise make every later stamp here carry that year. The
version such a peer wrote is still accepted, stored and replicated (nothing
acknowledged anywhere is lost); it only does not drag this clock along. While
it stays live it wins against concurrent writes, as a write from a fast clock
does; a write made here after seeing it supersedes it as any later write does,
because a write removes every version of its key it has seen, whatever their
stamps. Such stamps are counted (``HybridClock.skewed``) and logged, one line
per minute at most.
"""

from __future__ import annotations

import functools
import logging
import time
from binascii import a2b_base64, b2a_base64
from typing import Callable, NamedTuple


class Stamp(NamedTuple):
    """Ordered as (wall_ms, counter, replica).

    A tuple, not a dataclass: stamps are compared, hashed and sorted for
    every version a replica holds, and tuples do that in C.
    """

    wall_ms: int
    counter: int
    replica: str

    def encode(self) -> str:
        """A string whose lexical order is the stamp order (fixed-width hex)."""
        # %-formatting: the same text as an f-string with format specs, at a
        # third of the cost (a put encodes three stamps).
        return "%012x.%04x.%s" % (self.wall_ms, self.counter, self.replica)

    @classmethod
    def decode(cls, text: str) -> Stamp:
        """Read a stamp in either form, :meth:`encode` or :meth:`compact`."""
        if "." in text:
            wall, counter, replica = text.split(".", 2)
            return cls(int(wall, 16), int(counter, 16), replica)
        try:
            return _decode_compact(text)
        except ValueError:  # binascii.Error is one
            raise ValueError(f"not a stamp: {text!r}") from None

    def compact(self) -> str:
        """A shorter text for the same stamp, where it is stored once per version.

        Version ids carry a stamp each, in every document and on the wire, so
        they use this form: 16 or 18 characters instead of 30. Wall time in 7
        digits of base 64 (until the year 2109), the counter in 1 digit (3 when
        it is 64 or more), a 12-hex-digit replica id in 8 digits. A stamp that
        does not fit (another replica id form, a far-future wall time) keeps the
        long form of :meth:`encode`; :meth:`decode` reads both. The alphabet has
        no ``.``, which every long form contains, and is in ASCII order, so a
        compact text sorts like its stamp among texts of the same length.
        """
        # A put computes the id of the version it adds and, when that version is
        # superseded, of the same stamp again: remember the recent ones.
        return _compact_cached(self)

    def iso(self) -> str:
        seconds, ms = divmod(self.wall_ms, 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


_MAX_COUNTER = 0xFFFF
# How far ahead of the local wall clock a stamp seen from elsewhere may move
# the clock (NetworkLimits.max_clock_skew_s sets it for an agent).
DEFAULT_MAX_SKEW_MS = 300_000
_SKEW_LOG_EVERY_S = 60.0

log = logging.getLogger(__name__)

_DIGITS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TO_OURS = str.maketrans(_BASE64, _DIGITS)
_TO_BASE64 = str.maketrans(_DIGITS, _BASE64)
_WALL_LIMIT = 64**7
_COUNTER_LIMIT = 64**3
_MASK48 = (1 << 48) - 1


def _compact_text(stamp: Stamp) -> str:
    """The text of :meth:`Stamp.compact` (uncached).

    The digits fall into three fields: 7 for the wall time, 1 (or 3) for the
    counter and 8 for the replica id. Consecutive stamps share the wall time
    and the replica, so those two fields are remembered and only the counter
    digit is new.
    """
    wall, counter, replica = stamp
    if wall >= _WALL_LIMIT or counter >= _COUNTER_LIMIT:
        return stamp.encode()
    replica_digits = _replica_digits(replica)
    if replica_digits is None:
        return stamp.encode()
    if counter < 64:
        return _wall_digits(wall) + _DIGITS[counter] + replica_digits
    return (
        _wall_digits(wall)
        + _DIGITS[counter >> 12]
        + _DIGITS[(counter >> 6) & 63]
        + _DIGITS[counter & 63]
        + replica_digits
    )


@functools.lru_cache(maxsize=1024)
def _wall_digits(wall: int) -> str:
    """7 digits for a wall time below 64**7 (through binascii: 42 bits, 7 digits)."""
    return b2a_base64((wall << 6).to_bytes(6, "big"), newline=False).decode().translate(_TO_OURS)[:7]


@functools.lru_cache(maxsize=64)
def _replica_digits(replica: str) -> str | None:
    """8 digits for a 12-hex-digit replica id; None for other id forms."""
    if len(replica) != 12:
        return None
    try:
        packed = int(replica, 16)
    except ValueError:
        return None
    if packed < 0 or "%012x" % packed != replica:  # upper case, sign, "_": not our ids
        return None
    return b2a_base64(packed.to_bytes(6, "big"), newline=False).decode().translate(_TO_OURS)


_compact_cached = functools.lru_cache(maxsize=16384)(_compact_text)


def _decode_compact(text: str) -> Stamp:
    """The inverse of :meth:`Stamp.compact`."""
    if "+" in text or "/" in text:  # base64 digits that are not ours
        raise ValueError(text)
    if len(text) == 16:
        raw = a2b_base64(text.translate(_TO_BASE64), strict_mode=True)
        number = int.from_bytes(raw, "big")
        return Stamp(number >> 54, (number >> 48) & 63, "%012x" % (number & _MASK48))
    if len(text) == 18:
        raw = a2b_base64(("--" + text).translate(_TO_BASE64), strict_mode=True)
        number = int.from_bytes(raw, "big")
        return Stamp(number >> 66, (number >> 48) & 0x3FFFF, "%012x" % (number & _MASK48))
    raise ValueError(text)


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """Issues stamps for one replica.

    Args:
        replica: this replica's id, unique in the fleet.
        wall_ms: the physical clock; tests pass a fake one.
    """

    def __init__(
        self, replica: str, wall_ms: Callable[[], int] = system_wall_ms, max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    ) -> None:
        if "." in replica or not replica:
            raise ValueError("a replica id is non-empty and has no '.'")
        self.replica = replica
        self.wall_ms = wall_ms
        self.max_skew_ms = max_skew_ms
        self._last = Stamp(0, 0, replica)
        self.skewed = 0  # stamps seen further ahead than max_skew_ms (not adopted)
        self._skew_logged_at = -_SKEW_LOG_EVERY_S

    def now(self) -> Stamp:
        """A new stamp, later than every stamp issued or observed here."""
        wall = self.wall_ms()
        last = self._last
        if wall > last.wall_ms:
            stamp = Stamp(wall, 0, self.replica)
        elif last.counter < _MAX_COUNTER:
            stamp = Stamp(last.wall_ms, last.counter + 1, self.replica)
        else:
            # The counter is fixed-width so that encoded stamps sort as strings;
            # past its range we borrow the next millisecond instead.
            stamp = Stamp(last.wall_ms + 1, 0, self.replica)
        self._last = stamp
        return stamp

    @property
    def last(self) -> Stamp:
        """The latest stamp issued or observed here."""
        return self._last

    def observe(self, seen: Stamp) -> None:
        """Move past a stamp that arrived from another replica, up to ``max_skew_ms`` ahead."""
        last = self._last
        if (seen.wall_ms, seen.counter) <= (last.wall_ms, last.counter):
            return  # the usual case: nothing newer than what this clock issued
        limit = self.wall_ms() + self.max_skew_ms
        if seen.wall_ms > limit:
            self._note_skew(seen)
            if last.wall_ms >= limit:
                return
            seen = Stamp(limit, 0, seen.replica)
        self._last = Stamp(seen.wall_ms, seen.counter, self.replica)

    def _note_skew(self, seen: Stamp) -> None:
        self.skewed += 1
        now = time.monotonic()
        if now - self._skew_logged_at >= _SKEW_LOG_EVERY_S:
            self._skew_logged_at = now
            log.warning(
                "a stamp from replica %s is %.0f s ahead of this clock (the limit is %.0f s): "
                "its writes are kept, but this clock does not follow it; check that replica's time "
                "(%d such stamps so far)",
                seen.replica[:64], (seen.wall_ms - self.wall_ms()) / 1000, self.max_skew_ms / 1000, self.skewed,
            )

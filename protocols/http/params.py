"""Parsing of query parameters and bodies, with errors a user can act on."""

from __future__ import annotations

import re

from konsul.sync.errors import InvalidArgument

from .request import current_request

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
MAX_INT_DIGITS = 20  # 2**64 has 20
_INTEGER = re.compile(r"-?[0-9]{1,%d}" % MAX_INT_DIGITS)
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# The longest duration any parameter takes (about a century, as Go's ~292
# years): "9" * 400 + "s" is a float infinity, and a TTL from it no integer.
MAX_DURATION_S = 100 * 365 * 24 * 3600.0


def parse_duration(text: str, name: str) -> float:
    """Seconds in a Go duration ("10s", "1m30s", "500ms"); a bare number is seconds."""
    total = _parse_duration(text.strip(), name)
    if not total <= MAX_DURATION_S:  # also false for NaN
        raise InvalidArgument(f"{name} is at most {MAX_DURATION_S:.0f}s (about a century)")
    return total


def _parse_duration(text: str, name: str) -> float:
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise InvalidArgument(f"{name}={text!r} is not a duration; write e.g. 10s, 1m30s or 500ms")
    return total


def flag(name: str) -> bool:
    """A Consul boolean flag: present (``?recurse`` or ``?recurse=true``) unless set false."""
    raw = current_request().args.get(name)
    if raw is None:
        return False
    return raw.lower() not in ("false", "0", "no")


def int_arg(name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = current_request().args.get(name)
    if raw is None or raw == "":
        return default
    # Digits only: int() would also take " 7", "+7", "7_0" and "٧", and spend
    # quadratic time on thousands of digits.
    if not _INTEGER.fullmatch(raw):
        raise InvalidArgument(f"{name}={raw[:40]!r} is not an integer of at most {MAX_INT_DIGITS} digits")
    value = int(raw)
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}")
    if value >= 2**64:
        raise InvalidArgument(f"{name} is an unsigned 64-bit integer")
    return value


def duration_arg(name: str) -> float | None:
    raw = current_request().args.get(name)
    return None if raw is None else parse_duration(raw, name)

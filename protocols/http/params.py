"""Parsing of query parameters and bodies, with errors a user can act on."""

from __future__ import annotations

import re

from quart import request

from konsul.sync.errors import InvalidArgument

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, name: str) -> float:
    """Seconds in a Go duration ("10s", "1m30s", "500ms"); a bare number is seconds."""
    text = text.strip()
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
    if name not in request.args:
        return False
    return request.args[name].lower() not in ("false", "0", "no")


def int_arg(name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}")
    return value


def duration_arg(name: str) -> float | None:
    raw = request.args.get(name)
    return None if raw is None else parse_duration(raw, name)

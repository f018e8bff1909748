"""Listen addresses as the flags give them: ``HOST:PORT``, ``[v6]:PORT``, ``:PORT``."""

from __future__ import annotations

# What a malformed address is told, by default: ``{what}`` is the flag.
FLAG_USAGE = "{what} must be HOST:PORT, got {addr!r}"


def split_addr(addr: str, what: str, *, need_host: bool = False, usage: str = FLAG_USAGE) -> tuple[str, int]:
    """``(host, port)`` from ``addr``; an empty host is 127.0.0.1, port 0 picks a free one.

    ``need_host`` refuses an empty host instead; ``usage`` is the message for a
    malformed address (``{what}`` and ``{addr!r}`` filled in).

    Raises:
        ValueError: ``addr`` is not HOST:PORT with a port in 0..65535 (``what`` names the flag).
    """
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or (need_host and not host):
        raise ValueError(usage.format(what=what, addr=addr))
    return host or "127.0.0.1", int(port)

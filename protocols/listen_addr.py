"""Listen addresses as the flags give them: ``HOST:PORT``, ``[v6]:PORT``, ``:PORT``."""

from __future__ import annotations


def split_addr(addr: str, what: str) -> tuple[str, int]:
    """``(host, port)`` from ``addr``; an empty host is 127.0.0.1, port 0 picks a free one.

    Raises:
        ValueError: ``addr`` is not HOST:PORT with a port in 0..65535 (``what`` names the flag).
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)

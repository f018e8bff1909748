"""CPython stand-in for MicroPython's ``usocket``: sockets that are streams.

MicroPython sockets have ``read(n)`` / ``write(buf, n)``; umqtt.simple relies
on their semantics: a blocking ``read(n)`` returns n bytes unless the peer
closed (then fewer, ``b""`` at EOF), a non-blocking one returns ``None`` when
nothing is there, and ``write`` takes ``str`` as UTF-8.
"""

from __future__ import annotations

import socket as _socket
from socket import AF_INET, SOCK_STREAM, getaddrinfo as _getaddrinfo  # noqa: F401


def getaddrinfo(host: str, port: int, af: int = 0, socktype: int = 0, proto: int = 0, flags: int = 0) -> list:
    return _getaddrinfo(host, port, af, socktype or SOCK_STREAM, proto, flags)


class socket:  # noqa: N801 - the MicroPython name
    def __init__(self, af: int = AF_INET, kind: int = SOCK_STREAM, proto: int = 0) -> None:
        self._sock = _socket.socket(af, kind, proto)

    def connect(self, addr: tuple) -> None:
        self._sock.connect(addr)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def read(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            try:
                chunk = self._sock.recv(n - len(chunks))
            except BlockingIOError:
                if not chunks:
                    return None
                self._sock.setblocking(True)  # a frame has begun: finish reading it
                continue
            if not chunk:
                break
            chunks += chunk
        return bytes(chunks)

    def write(self, data: bytes | bytearray | str, length: int | None = None) -> int:
        buf = data.encode() if isinstance(data, str) else bytes(data)
        if length is not None:
            buf = buf[:length]
        self._sock.sendall(buf)
        return len(buf)

    def close(self) -> None:
        self._sock.close()

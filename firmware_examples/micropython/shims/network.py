"""CPython stand-in for MicroPython's ``network``: a Wi-Fi that is always up."""

from __future__ import annotations

STA_IF = 0
AP_IF = 1


class WLAN:
    def __init__(self, interface: int = STA_IF) -> None:
        self._active = False
        self._connected = False

    def active(self, on: bool | None = None) -> bool | None:
        if on is None:
            return self._active
        self._active = bool(on)
        return None

    def connect(self, ssid: str, key: str | None = None) -> None:
        self._connected = self._active

    def disconnect(self) -> None:
        self._connected = False

    def isconnected(self) -> bool:
        return self._connected

    def ifconfig(self) -> tuple[str, str, str, str]:
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

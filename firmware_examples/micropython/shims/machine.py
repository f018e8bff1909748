"""CPython stand-in for MicroPython's ``machine``: pins, the ADC, the chip id."""

from __future__ import annotations

import math
import os
import time


class Pin:
    OUT = 1
    IN = 0

    def __init__(self, pin_id: int | str, mode: int = -1, value: int | None = None) -> None:
        self.id = pin_id
        self._value = 0 if value is None else int(bool(value))

    def value(self, new: int | bool | None = None) -> int | None:
        if new is None:
            return self._value
        self._value = int(bool(new))
        return None

    def on(self) -> None:
        self._value = 1

    def off(self) -> None:
        self._value = 0


class ADC:
    """Reads what a Pico's internal sensor would show around 20-25 degC."""

    def __init__(self, channel: int | Pin) -> None:
        self.channel = channel

    def read_u16(self) -> int:
        celsius = 22.5 + 2.5 * math.sin(time.time() / 60.0)
        volts = 0.706 - (celsius - 27.0) * 0.001721  # the RP2040 datasheet's formula, inverted
        return int(volts / 3.3 * 65535)


def unique_id() -> bytes:
    return b"host" + os.getpid().to_bytes(4, "big")


def reset() -> None:
    raise SystemExit("machine.reset()")

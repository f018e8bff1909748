"""Client commands (`konsul kv ...`, `konsul services ...`): filled in next."""

from __future__ import annotations


def add_commands(commands, add_flag) -> None:
    return None

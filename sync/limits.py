"""Key and value rules shared by every protocol."""

from __future__ import annotations

from .errors import InvalidArgument, InvalidKey, ValueTooLarge

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 512 * 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid KV key, else raise :class:`InvalidKey`.

    Keys are UTF-8, 1 to 512 bytes, with no leading ``/``, no NUL and no ``..``
    path segment.
    """
    # Every put checks its key: take the usual one (ASCII, no "..") in one test.
    if (
        type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES
        and key[0] != "/" and "\x00" not in key and ".." not in key
    ):
        return key
    if check_prefix(key) == "":
        raise InvalidKey("a key must not be empty")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key` but allows the empty prefix (the whole keyspace)."""
    if not isinstance(prefix, str):
        raise InvalidKey("a key is a string")
    try:
        size = len(prefix.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a key must be valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a key is at most {MAX_KEY_BYTES} bytes; this one has {size}")
    if "\x00" in prefix:
        raise InvalidKey("a key must not contain NUL")
    if prefix.startswith("/"):
        raise InvalidKey("a key must not start with '/'")
    if ".." in prefix.split("/"):
        raise InvalidKey("a key must not contain a '..' segment")
    return prefix


def check_value(value: bytes) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise ValueTooLarge(
            f"a value is at most {MAX_VALUE_BYTES} bytes; this one has {len(value)}"
        )
    return value


def check_flags(flags: int) -> int:
    if not 0 <= flags < 2**64:
        raise InvalidArgument("flags is an unsigned 64-bit integer")
    return flags

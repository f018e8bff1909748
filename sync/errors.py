"""Typed errors of the state layer.

Protocol adapters map each class to a status (HTTP 4xx/5xx, CoAP 4.xx/5.xx) with
its ``code`` as the short error name and ``str(error)`` as the detail, so that
a user always learns what to do next.
"""

from __future__ import annotations


class KonsulError(Exception):
    """Base of every error the state layer raises on purpose."""

    code = "internal"
    status = 500


class InvalidKey(KonsulError):
    code = "invalid_key"
    status = 400


class ValueTooLarge(KonsulError):
    code = "value_too_large"
    status = 413


class InvalidArgument(KonsulError):
    code = "invalid_argument"
    status = 400


class NotFound(KonsulError):
    code = "not_found"
    status = 404


class CasMissingKey(KonsulError):
    """A check-and-set on a non-zero index names a key that does not exist."""

    code = "cas_missing_key"
    status = 409


class StoreError(KonsulError):
    """The durable store could not take a write; nothing of it was acknowledged."""

    code = "store_error"
    status = 503


class StoreFull(StoreError):
    code = "store_full"
    status = 507


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class StoreLocked(StoreError):
    code = "store_locked"

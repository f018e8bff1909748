"""The OSCORE security contexts (RFC 8613) of the devices this edge serves.

A device's context is provisioned through the device registry
(``PUT /v1/devices/<id>?oscore=true``, protocols/http/device_routes.py); what
it is made of is split by who may see it:

- the master secret and salt stay on this edge, in ``<data-dir>/oscore/``
  (0700): one directory per context, named by the device's Sender ID in hex,
  holding aiocoap's ``secret.json`` (0600), the ``device`` it was made for,
  and aiocoap's ``sequence.json`` and ``lock``. The secret never enters the
  replicated records, so it reaches neither the hub nor any other replica.
- the device record (sync/devices.py) names the context's Sender ID
  (``oscore_id``). A context is in force only while its device's record names
  it: provisioning again writes a new context and then the record, deleting
  the device deletes the record; either way every replica sees the change and
  this edge drops the old directory, so the old context stops working at once.

Contexts are loaded (aiocoap's ``FilesystemSecurityContext``, which imports
``cryptography``) on the first request that uses them, never at start-up: an
edge whose devices do not use OSCORE pays nothing for it. aiocoap persists
sequence numbers ahead of use (RFC 8613 B.1.1) and, after an unclean stop,
recovers the replay window with an Echo round trip (B.1.2), so a ``kill -9``
can neither make the edge reuse a nonce nor accept a replayed request;
:meth:`OscoreContexts.run` writes the exact state back on a clean stop.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from konsul.sync.store import fsync_directory

if TYPE_CHECKING:
    from konsul.sync.scope import Scope

log = logging.getLogger("konsul.oscore")

ALGORITHM = "AES-CCM-16-64-128"  # RFC 8613's mandatory-to-implement AEAD
HKDF = "sha256"
SENDER_ID_BYTES = 4  # the device's Sender ID (its 'kid' on the wire): random, unique on this edge
EDGE_SENDER_ID = b"\x01"  # the edge's own Sender ID in every context (each has its own secret)
SECRET_BYTES = 32
SALT_BYTES = 8
_PARTIAL = ".new-"  # a context being written; removed at start if a crash left it


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def device_material(device_id: str, secret: bytes, salt: bytes, sender_id: bytes) -> dict[str, Any]:
    """The context as the device sees it (its Sender ID is the edge's Recipient ID), shown once.

    ``Aiocoap`` is the same in aiocoap's format: saved as ``secret.json`` in
    a directory, it is an ``{"oscore": {"basedir": ...}}`` client credential
    (docs/coap.md).
    """
    return {
        "SenderID": sender_id.hex(),
        "RecipientID": EDGE_SENDER_ID.hex(),
        "MasterSecret": secret.hex(),
        "MasterSalt": salt.hex(),
        "IDContext": None,
        "Algorithm": ALGORITHM,
        "HKDF": "HKDF-SHA-256",
        "Aiocoap": {
            "sender-id_hex": sender_id.hex(),
            "recipient-id_hex": EDGE_SENDER_ID.hex(),
            "secret_hex": secret.hex(),
            "salt_hex": salt.hex(),
            "algorithm": ALGORITHM,
            "kdf-hashfun": HKDF,
        },
    }


class OscoreContexts:
    """The contexts of one edge's devices: files in the data directory, in force while their record names them."""

    def __init__(self, data_dir: Path, scope: Scope) -> None:
        self.root = Path(data_dir) / "oscore"
        self.scope = scope
        self._device_of: dict[bytes, str] = {}  # Sender ID -> the device its directory was made for
        self._ids_of: dict[str, set[bytes]] = {}  # device -> its contexts' Sender IDs (more than one while rotating)
        self._pending: set[bytes] = set()  # written, not yet named by a record
        self._loaded: dict[bytes, Any] = {}  # Sender ID -> DeviceSecurityContext (protocols/coap/oscore_context.py)

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, follow the device registry until cancelled, then write back loaded contexts."""
        self.open()  # in this thread: it reads the device records (a few small files per context otherwise)
        self.scope.listeners.append(self._changed)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.scope.listeners.remove(self._changed)
            self.close()

    def open(self) -> None:
        """Index the contexts on disk; remove those no record names (a crash mid-provisioning, a deleted device)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for entry in sorted(os.listdir(self.root)):
            path = self.root / entry
            try:
                sender_id = bytes.fromhex(entry)
                device_id = (path / "device").read_text().strip()
            except (ValueError, OSError):
                sender_id, device_id = b"", ""
            if sender_id and self._named(device_id, sender_id):
                self._add(sender_id, device_id)
            else:
                log.info("removing OSCORE context %s (no device record names it)", entry)
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Persist the exact sequence numbers and replay windows of loaded contexts, and unlock them."""
        for context in self._loaded.values():
            try:
                context.close()
            except OSError as error:
                log.warning("OSCORE context of %s not written back: %s", context.device_id, error)
        self._loaded.clear()

    # -- provisioning (HTTP) ---------------------------------------------------------

    async def create(self, device_id: str) -> tuple[str, dict[str, Any]]:
        """Write a new context for ``device_id``; returns its Sender ID (hex) and the device's material.

        It is in force once the device's record names the ID (the caller
        writes it, then calls :meth:`settled`); until then no request can use
        it and start-up removes it.
        """
        while True:
            sender_id = secrets.token_bytes(SENDER_ID_BYTES)
            if sender_id not in self._device_of and sender_id != EDGE_SENDER_ID:
                break
        secret, salt = secrets.token_bytes(SECRET_BYTES), secrets.token_bytes(SALT_BYTES)
        self._add(sender_id, device_id)
        self._pending.add(sender_id)
        aiocoap_form = {
            "sender-id_hex": EDGE_SENDER_ID.hex(),
            "recipient-id_hex": sender_id.hex(),
            "secret_hex": secret.hex(),
            "salt_hex": salt.hex(),
            "algorithm": ALGORITHM,
            "kdf-hashfun": HKDF,
        }
        try:
            await trio.to_thread.run_sync(self._write, sender_id, device_id, json.dumps(aiocoap_form))
        except BaseException:
            self.settled(sender_id, False)
            raise
        return sender_id.hex(), device_material(device_id, secret, salt, sender_id)

    def _write(self, sender_id: bytes, device_id: str, secret_json: str) -> None:
        partial = self.root / (_PARTIAL + sender_id.hex())
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o700)
        _write_private(partial / "secret.json", secret_json)
        _write_private(partial / "device", device_id + "\n")
        fsync_directory(partial)
        os.rename(partial, self.root / sender_id.hex())
        fsync_directory(self.root)

    def settled(self, sender_id_hex: str | bytes, named: bool) -> None:
        """The record write for a created context is over; ``named`` False (it failed) removes the context."""
        sender_id = bytes.fromhex(sender_id_hex) if isinstance(sender_id_hex, str) else sender_id_hex
        self._pending.discard(sender_id)
        device_id = self._device_of.get(sender_id)
        if not named or device_id is None or not self._named(device_id, sender_id):
            self._retire(sender_id)

    # -- requests (CoAP) ---------------------------------------------------------------

    @property
    def any(self) -> bool:
        """Whether any context exists here (otherwise an OSCORE request is refused without loading crypto)."""
        return bool(self._device_of)

    def context(self, sender_id: bytes) -> Any | None:
        """The loaded context a request's Sender ID ('kid') selects, if it is in force."""
        device_id = self._device_of.get(sender_id)
        if device_id is None or sender_id in self._pending or not self._named(device_id, sender_id):
            return None
        context = self._loaded.get(sender_id)
        if context is None:
            from .coap.oscore_context import DeviceSecurityContext

            try:
                context = DeviceSecurityContext(str(self.root / sender_id.hex()), device_id, sender_id)
            except Exception as error:  # noqa: BLE001 - a damaged context refuses its device, not the edge
                log.error("OSCORE context %s of %s cannot be loaded: %s", sender_id.hex(), device_id, error)
                return None
            self._loaded[sender_id] = context
        return context

    def in_force(self, device_id: str, sender_id: bytes) -> bool:
        return self._device_of.get(sender_id) == device_id and sender_id not in self._pending and self._named(
            device_id, sender_id
        )

    # -- the registry changed ---------------------------------------------------------------

    def _named(self, device_id: str, sender_id: bytes) -> bool:
        record = self.scope.devices.get(device_id)
        return record is not None and record.oscore_id == sender_id.hex()

    def _changed(self, collection: str, keys: set[str]) -> None:
        if collection != "devices":
            return
        for key in keys:
            if not key.startswith("d/"):
                continue
            device_id = key[2:]
            for sender_id in list(self._ids_of.get(device_id, ())):
                if sender_id not in self._pending and not self._named(device_id, sender_id):
                    self._retire(sender_id)  # rotated or deleted: the old context ends now

    def _add(self, sender_id: bytes, device_id: str) -> None:
        self._device_of[sender_id] = device_id
        self._ids_of.setdefault(device_id, set()).add(sender_id)

    def _retire(self, sender_id: bytes) -> None:
        device_id = self._device_of.pop(sender_id, None)
        ids = self._ids_of.get(device_id)
        if ids is not None:
            ids.discard(sender_id)
            if not ids:
                del self._ids_of[device_id]
        self._pending.discard(sender_id)
        context = self._loaded.pop(sender_id, None)
        if context is not None:
            context.retire()
        shutil.rmtree(self.root / sender_id.hex(), ignore_errors=True)

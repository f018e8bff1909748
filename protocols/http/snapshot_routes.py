"""Consul's ``/v1/snapshot``: save (``GET``) and restore (``PUT``) an edge's or a hub's state.

``GET`` streams a snapshot of the data directory (sync/snapshot.py has the
format and why it is consistent under writes; sync/snapshot_hub.py a hub's,
with every scope's store); ``X-Consul-Index`` is the site's (at the hub,
``global``'s) index at the snapshot. ``PUT`` streams the upload to a file in
the data directory, bounded by ``--snapshot-max-bytes`` rather than the API's
1 MiB body bound (a snapshot is as large as the store), checks it whole and
stages it; the agent loads it at its next start, before it opens its store,
since replacing the store under a running agent would leave its memory, its
sync sessions and its devices' OSCORE contexts describing the old state. An
agent that holds keys, services or devices refuses it (409 ``has_data``)
unless ``?force``. Both need a management token, as in Consul.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import trio

from konsul.sync.acl_rules import PermissionDenied
from konsul.sync.errors import KonsulError

from . import authz
from .context import HttpContext
from .request import Request, current_request, request
from .responses import Response, json_response
from .router import Routes

snapshot_api = Routes("snapshot")

CHUNK = 64 * 1024
# An upload is written to its file in pieces of about this size.
WRITE_CHUNK = 1024 * 1024


class SnapshotTooLarge(KonsulError):
    """An upload larger than ``--snapshot-max-bytes`` (nothing was staged)."""

    status = 413
    code = "too_large"
    # The rest of the body is not read: this connection cannot carry another request.
    headers = {"Connection": "close"}


class SnapshotUploadCut(KonsulError):
    """The upload reached this route already cut short (nothing was staged)."""

    status = 503
    code = "upload_cut"
    headers = {"Connection": "close"}


def _data_dir(ctx: HttpContext) -> Path:
    authorizer = authz.authorizer()
    if not authorizer.management:
        raise PermissionDenied("snapshots need a management token (the global-management policy), as in Consul")
    return ctx.replica.store.path.parent


def _save(ctx: HttpContext, data_dir: Path, work: Path) -> tuple[Path, dict]:
    from konsul.sync import snapshot  # the archive code (tarfile): imported when a snapshot is taken or staged

    if ctx.role == "hub":
        from konsul.sync.snapshot_hub import save_hub

        return save_hub(data_dir, work)
    return snapshot.save(data_dir, ctx.site, work)


@snapshot_api.route("/v1/snapshot", methods=["GET"])
async def save_snapshot() -> Response:
    ctx: HttpContext = request.ctx
    data_dir = _data_dir(ctx)
    work = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=data_dir))
    try:
        archive, meta = await trio.to_thread.run_sync(_save, ctx, data_dir, work)
        file = open(archive, "rb")  # noqa: SIM115 - closed by the stream below
    finally:
        # The open file keeps the archive readable; the directory goes now,
        # so a client that never reads the answer leaves nothing behind.
        shutil.rmtree(work, ignore_errors=True)
    size = os.fstat(file.fileno()).st_size
    headers = {
        "X-Consul-Index": str(meta["Index"]),
        "Content-Disposition": 'attachment; filename="konsul.snap"',
        "Content-Length": str(size),
    }
    return Response(_stream(file), status=200, content_type="application/gzip", headers=headers)


async def _stream(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := file.read(CHUNK):
            yield chunk
    finally:
        file.close()


@snapshot_api.route("/v1/snapshot", methods=["PUT"])
async def restore_snapshot() -> Response:
    from konsul.sync import snapshot  # the archive code (tarfile): imported when a snapshot is taken or staged

    ctx: HttpContext = request.ctx
    _data_dir(ctx)  # the token is judged before a byte of the body is read
    force = request.args.get("force", "false").lower() not in ("false", "0", "no")
    same_replica = request.args.get("same-replica", "false").lower() not in ("false", "0", "no")
    upload = BodyChunks(current_request())
    try:
        meta = await stage_restore(ctx, upload.chunks(), upload.declared_length(), force=force,
                                   same_replica=same_replica)
    except KonsulError as error:
        if not upload.read_whole:
            # Answered before the body was read whole (refused, or too large): the rest of
            # the body is still on the connection, which cannot carry another request.
            error.headers = {**(getattr(error, "headers", None) or {}), "Connection": "close"}
        raise
    return json_response({
        "Staged": True,
        "Role": snapshot.archive_role(meta),
        "Site": meta.get("Site"),
        "Index": meta.get("Index"),
        "Replica": meta.get("Replica"),
        "detail": "the snapshot is checked and staged: restart the agent to load it",
    })


class BodyChunks:
    """A request body chunk by chunk, without the app-wide body bound.

    The app reads every other body whole before its handler runs (app.py,
    ``STREAMED_BODIES``); this route bounds the upload itself (``stage_restore``).
    """

    def __init__(self, req: Request) -> None:
        self.request = req
        self.read_whole = False

    def declared_length(self) -> int | None:
        declared = self.request.headers.get("content-length")
        return int(declared) if declared is not None and declared.strip().isdigit() else None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.request._next_body_message()  # noqa: SLF001
            if message["type"] == "http.disconnect":
                raise SnapshotUploadCut("the client closed the connection before the upload ended")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.read_whole = True
                return


async def stage_restore(
    ctx: HttpContext, chunks: AsyncIterator[bytes], declared: int | None, *, force: bool, same_replica: bool,
) -> dict:
    """Receive an uploaded snapshot from ``chunks``, check it whole and stage it; its meta.

    Raises:
        SnapshotTooLarge: ``declared`` (the Content-Length) or the body passes
            ``--snapshot-max-bytes``; nothing was staged.
        SnapshotInvalid: not an intact snapshot of this kind of agent.
        RestoreRefused: the agent holds data and ``force`` is not set.
    """
    from konsul.sync import snapshot  # the archive code (tarfile): imported when a snapshot is taken or staged

    data_dir = ctx.replica.store.path.parent
    limit = ctx.limits.snapshot_max_bytes
    if declared is not None and declared > limit:
        raise SnapshotTooLarge(_too_large(declared, limit))
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        upload = work / "upload.tar.gz"
        await receive_upload(chunks, upload, limit)
        with open(upload, "rb") as archive:
            meta = await trio.to_thread.run_sync(snapshot.check, archive, work / "unpacked")
        role = snapshot.archive_role(meta)
        if role != ctx.role:
            raise snapshot.SnapshotInvalid(f"the snapshot is a {role}'s and this agent is a {ctx.role}: "
                                           f"restore it into a {role}")
        if not force and _holds_data(ctx):
            raise snapshot.RestoreRefused(
                "this agent already holds keys, services or devices; restore with ?force=true to replace "
                "them, or restore offline into an empty data directory (konsul snapshot restore)"
            )
        options = data_dir / (snapshot.PENDING_NAME + ".json")
        options.write_text(json.dumps({"same_replica": same_replica}))
        os.replace(upload, data_dir / snapshot.PENDING_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


async def receive_upload(chunks: AsyncIterator[bytes], target: Path, limit: int) -> int:
    """Write the body ``chunks`` to the new file ``target`` (0600), at most ``limit`` bytes; its size.

    The body never sits whole in memory: pieces go to the file as they come.
    They are written on the event loop's thread, on purpose: a write to the
    page cache takes about a millisecond per MiB, and while it runs nothing
    reads more of the body, so the socket's own flow control holds the client
    back when the disk is slower than the network (quart buffers whatever it
    is handed; a thread would let it buffer the whole body meanwhile).

    Raises:
        SnapshotTooLarge: more than ``limit`` bytes came; ``target`` is removed.
    """
    from konsul.sync import snapshot  # the archive code (tarfile): imported when a snapshot is taken or staged

    size = 0
    pending = bytearray()
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, snapshot.PRIVATE_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as file:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise SnapshotTooLarge(_too_large(size, limit))
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    file.write(pending)
                    pending.clear()
            file.write(pending)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return size


def _too_large(size: int, limit: int) -> str:
    return (f"the snapshot is larger than this agent accepts ({size} > {limit} bytes): restart it with a larger "
            "--snapshot-max-bytes, or restore offline with konsul snapshot restore FILE --data-dir DIR")


def _holds_data(ctx: HttpContext) -> bool:
    for scope in ctx.replica.scopes.values():
        if len(scope.kv) or scope.catalog.services() or scope.devices.records():
            return True
    if ctx.role == "hub":
        from konsul.sync.snapshot_hub import SITE_CREDENTIAL_ROWS

        return bool(ctx.replica.store.query("SELECT 1 FROM meta WHERE name LIKE ? LIMIT 1", SITE_CREDENTIAL_ROWS))
    return False

"""Consul's ``/v1/snapshot``: save (``GET``) and restore (``PUT``) an edge's state.

``GET`` streams a snapshot of the data directory (sync/snapshot.py has the
format and why it is consistent under writes); ``X-Consul-Index`` is the
site's index at the snapshot. ``PUT`` checks an uploaded snapshot whole and
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

from konsul.sync import snapshot
from konsul.sync.acl_rules import PermissionDenied
from konsul.sync.errors import InvalidArgument

from . import authz
from .context import HttpContext
from .request import request
from .responses import Response, json_response
from .router import Routes

snapshot_api = Routes("snapshot")

CHUNK = 64 * 1024


def _edge_data_dir(ctx: HttpContext) -> Path:
    authorizer = authz.authorizer()
    if not authorizer.management:
        raise PermissionDenied("snapshots need a management token (the global-management policy), as in Consul")
    if ctx.role != "edge":
        raise InvalidArgument(
            "the hub keeps each site in a store of its own: back up its data directory with the hub "
            "stopped; /v1/snapshot is an edge's"
        )
    return ctx.replica.store.path.parent


@snapshot_api.route("/v1/snapshot", methods=["GET"])
async def save_snapshot() -> Response:
    ctx: HttpContext = request.ctx
    data_dir = _edge_data_dir(ctx)
    work = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=data_dir))
    try:
        archive, meta = await trio.to_thread.run_sync(snapshot.save, data_dir, ctx.site, work)
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
    ctx: HttpContext = request.ctx
    data_dir = _edge_data_dir(ctx)
    force = request.args.get("force", "false").lower() not in ("false", "0", "no")
    same_replica = request.args.get("same-replica", "false").lower() not in ("false", "0", "no")
    body = await request.get_data(cache=True)
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        upload = work / "upload.tar.gz"
        upload.write_bytes(body)
        with open(upload, "rb") as archive:
            meta = await trio.to_thread.run_sync(snapshot.check, archive, work / "unpacked")
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
    return json_response({
        "Staged": True,
        "Site": meta.get("Site"),
        "Index": meta.get("Index"),
        "Replica": meta.get("Replica"),
        "detail": "the snapshot is checked and staged: restart the agent to load it",
    })


def _holds_data(ctx: HttpContext) -> bool:
    for scope in ctx.replica.scopes.values():
        if len(scope.kv) or scope.catalog.services() or scope.devices.records():
            return True
    return False

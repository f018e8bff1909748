"""Operations: ``/metrics``, ``/health/live``, ``/health/ready``, ``/v1/sync/status``."""

from __future__ import annotations

from .request import request
from .responses import Response, json_response
from .router import Routes

ops_api = Routes("ops")


@ops_api.route("/metrics", methods=["GET"])
async def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    ctx = request.ctx
    return Response(generate_latest(ctx.registry), content_type=CONTENT_TYPE_LATEST)


@ops_api.route("/health/live", methods=["GET"])
async def live() -> Response:
    return json_response({"status": "live"})


@ops_api.route("/health/ready", methods=["GET"])
async def ready() -> Response:
    ctx = request.ctx
    if ctx.ready():
        return json_response({"status": "ready"})
    return json_response({"status": "starting"}, status=503)


@ops_api.route("/v1/sync/status", methods=["GET"])
async def sync_status() -> Response:
    ctx = request.ctx
    return json_response(ctx.sync_status())

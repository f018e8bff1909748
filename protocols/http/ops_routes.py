"""Operations: ``/metrics``, ``/health/live``, ``/health/ready``, ``/v1/sync/status``."""

from __future__ import annotations

from quart import Blueprint, Response, current_app

from .responses import json_response

ops_api = Blueprint("ops", __name__)


@ops_api.route("/metrics", methods=["GET"])
async def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    ctx = current_app.config["KONSUL"]
    return Response(generate_latest(ctx.registry), content_type=CONTENT_TYPE_LATEST)


@ops_api.route("/health/live", methods=["GET"])
async def live() -> Response:
    return json_response({"status": "live"})


@ops_api.route("/health/ready", methods=["GET"])
async def ready() -> Response:
    ctx = current_app.config["KONSUL"]
    if ctx.ready():
        return json_response({"status": "ready"})
    return json_response({"status": "starting"}, status=503)


@ops_api.route("/v1/sync/status", methods=["GET"])
async def sync_status() -> Response:
    ctx = current_app.config["KONSUL"]
    return json_response(ctx.sync_status())

"""``/v1/devices/<id>/telemetry`` and the fleet query ``/v1/telemetry``.

An edge ingests (``POST``, answered once the samples are durable in its
buffer) and shows the newest samples it holds; the hub shows everything edges
forwarded, for any site (``?dc=<site>``), and across the fleet by device type
or tag (``/v1/telemetry?type=&tag=``). Where the samples come from is the
agent's business: it puts a :class:`~.context.TelemetrySource` in the context.

Posting samples needs ``device:write`` on the device, reading them
``device:read``; the fleet query covers only the devices the token may read.
"""

from __future__ import annotations

import datetime

from konsul.sync.devices import check_device_id
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.telemetry import sample_fields, sample_json

from .agent_routes import json_body_any
from .authz import authorizer as request_authorizer
from .device_routes import listed_scopes, readable, records_matching, require_registered
from .params import int_arg
from .request import request
from .responses import Response, json_response
from .router import Routes

telemetry_api = Routes("telemetry")

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MAX_SAMPLES_PER_POST = 1_000
# What RFC 3339 can write: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, in unix seconds.
_EARLIEST_S = -62135596800.0
_LATEST_S = 253402300799.0


def time_arg(name: str) -> int | None:
    """Milliseconds since 1970 from ``?since=`` / ``?until=``: unix seconds or RFC 3339."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            parsed = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"{name}={raw[:64]!r} is neither unix seconds nor an RFC 3339 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        seconds = parsed.timestamp()
    # inf, nan and 1e308 have no millisecond (and SQLite no 64-bit integer for them).
    if not _EARLIEST_S <= seconds <= _LATEST_S:
        raise InvalidArgument(f"{name} is a time between the years 1 and 9999 (unix seconds or RFC 3339)")
    return int(seconds * 1000)


def _window() -> tuple[int | None, int | None, int]:
    limit = int_arg("limit", DEFAULT_LIMIT, minimum=1)
    if limit > MAX_LIMIT:
        raise InvalidArgument(f"limit is at most {MAX_LIMIT}")
    return time_arg("since"), time_arg("until"), limit


def _source():
    source = request.ctx.telemetry
    if source is None:
        raise NotFound("this agent keeps no telemetry")
    return source


@telemetry_api.route("/v1/devices/<device_id>/telemetry", methods=["GET", "POST"])
async def device_telemetry(device_id: str) -> Response:
    check_device_id(device_id)
    request_authorizer().require("device", device_id, "write" if request.method == "POST" else "read")
    scope = request.ctx.scope(request.args.get("dc"))
    source = _source()
    if request.method == "POST":
        require_registered(scope, device_id)
        body = await json_body_any()
        documents = body if isinstance(body, list) else [body]
        if not 1 <= len(documents) <= MAX_SAMPLES_PER_POST:
            raise InvalidArgument(f"post 1 to {MAX_SAMPLES_PER_POST} samples: an object, or a list of objects")
        for document in documents:
            sample_fields(document)  # all or nothing: a bad sample refuses the request
        await source.ingest(scope.name, [(device_id, document) for document in documents])
        return json_response({"Stored": len(documents)})
    since, until, limit = _window()
    found = await source.samples([(scope.name, device_id)], since, until, limit)
    return json_response([sample_json(site, sample) for site, sample in found])


@telemetry_api.route("/v1/telemetry", methods=["GET"])
async def fleet_telemetry() -> Response:
    """Samples of every device of a type or with tags, in one site or (at the hub) all."""
    ctx = request.ctx
    kind = request.args.get("type")
    tags = request.args.getlist("tag")
    if kind is None and not tags:
        raise InvalidArgument("name the devices: ?type=<device type> and/or ?tag=<tag> (repeatable)")
    devices = [
        (scope.name, record.device_id)
        for scope in listed_scopes(ctx, request.args.get("dc"), sites_only=True)
        for record in readable(records_matching(scope, kind, tags))
    ]
    since, until, limit = _window()
    found = await _source().samples(devices, since, until, limit)
    return json_response([sample_json(site, sample) for site, sample in found])

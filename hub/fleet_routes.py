"""Hub-only HTTP: ``/v1/sites``, every site's sync state."""

from __future__ import annotations

import time

from quart import Blueprint, Response, current_app

from konsul.protocols.http.responses import json_response

fleet_api = Blueprint("hub_fleet", __name__)


def site_summaries(hub: dict) -> list[dict]:
    replica, sites = hub["replica"], hub["sites"]
    now = time.time()
    names = (set(replica.scopes) | set(sites.sites)) - {"global"}
    found = []
    for name in sorted(names):
        state = sites.get(name)
        scope = replica.scopes.get(name)
        connected = state.connections > 0
        last_seen = state.last_seen
        found.append(
            {
                "Site": name,
                "Connected": connected,
                "Replica": state.replica,
                "LastSeen": None if last_seen is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_seen)),
                # How far behind the hub's copy may be: zero while connected and
                # caught up, else the time since the site was last heard from.
                "LagSeconds": 0.0 if connected and state.pending_to_edge == 0 or last_seen is None
                else round(now - last_seen, 3),
                "PendingToEdge": state.pending_to_edge,
                "Conflicts": 0 if scope is None else scope.conflicts(),
                "BytesSent": state.bytes_sent,
                "BytesReceived": state.bytes_received,
            }
        )
    return found


@fleet_api.route("/v1/sites", methods=["GET"])
async def sites() -> Response:
    return json_response(site_summaries(current_app.config["KONSUL_HUB"]))

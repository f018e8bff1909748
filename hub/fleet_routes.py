"""Hub-only HTTP: ``/v1/sites``, every site's sync state and credential.

``PUT /v1/sites/<site>`` issues the site's join token (shown once; a body may
set ``Global`` to ``read`` or ``write`` and a ``Description``), replacing any
earlier one; ``DELETE /v1/sites/<site>`` revokes it. Both end the site's open
sync sessions. They need ``operator:write``; the list needs ``operator:read``.
"""

from __future__ import annotations

import time

from konsul.protocols.http.agent_routes import json_body_any
from konsul.protocols.http.request import request
from konsul.protocols.http.responses import Response, json_response
from konsul.protocols.http.router import Routes
from konsul.sync.errors import InvalidArgument, NotFound

from .site_credentials import SiteCredentials, check_site_name
from .state import HubState, current_hub

fleet_api = Routes("hub_fleet")


def site_summaries(hub: HubState) -> list[dict]:
    replica, sites = hub.replica, hub.sites
    credentials: SiteCredentials | None = hub.site_credentials
    now = time.time()
    known = {c.site for c in credentials.all()} if credentials is not None else set()
    names = (set(replica.scopes) | set(sites.sites) | known) - {"global"}
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
                # The edge's telemetry buffer as it last reported it (null until it has).
                "Telemetry": None if state.telemetry is None else {
                    "Buffered": state.telemetry.get("buffered", 0),
                    "BufferedBytes": state.telemetry.get("buffered_bytes", 0),
                    "Dropped": state.telemetry.get("dropped", 0),
                    "Forwarded": state.telemetry.get("forwarded", 0),
                },
                "Credential": None if name not in known else credentials.get(name).to_json(),
            }
        )
    return found


@fleet_api.route("/v1/sites", methods=["GET"])
async def sites() -> Response:
    return json_response(site_summaries(current_hub()))


@fleet_api.route("/v1/sites/<site>", methods=["PUT", "DELETE"])
async def site_credential(site: str) -> Response:
    check_site_name(site)
    credentials: SiteCredentials = current_hub().site_credentials
    if request.method == "DELETE":
        found = await credentials.revoke(site)
        if found is None:
            raise NotFound(f"site {site!r} has no join token")
        return json_response(found.to_json())
    body = await json_body_any() if (await request.get_data()) else {}
    if not isinstance(body, dict):
        raise InvalidArgument('the body is {"Global": "read"|"write", "Description": "..."}')
    unknown = set(body) - {"Global", "Description"}
    if unknown:
        raise InvalidArgument(f"unknown fields {sorted(unknown)}; a site takes Global and Description")
    description = body.get("Description", "")
    if not isinstance(description, str):
        raise InvalidArgument("Description is a string")
    secret = await credentials.issue(site, body.get("Global", "read"), description)
    return json_response({**credentials.get(site).to_json(), "JoinToken": secret})

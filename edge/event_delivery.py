"""Where a user event goes at an edge once its EventLog holds it.

- Blocking ``/v1/event/list`` queries of its scope wake up.
- Devices hear it on MQTT ``konsul/v1/events/<name>`` (the event's JSON, as
  ``/v1/event/list`` shows it), if this edge's node takes it (its filters).
- The hub connector sends the ones fired here to the hub (edge/connector.py),
  which hands them on: a site's to its copy of the site, a global one to every
  other edge.
"""

from __future__ import annotations

import json
import logging

from konsul.protocols.gateway import GatewayContext
from konsul.protocols.http import HttpContext
from konsul.protocols.http.event_routes import notify_event, visible_here
from konsul.sync.events import EventLog, UserEvent

log = logging.getLogger("konsul.edge")


def deliver_events(events: EventLog, ctx: HttpContext, gateways: GatewayContext) -> None:
    """Install the listeners that take each new event of ``events`` to its readers."""

    def on_event(scope: str, event: UserEvent, local: bool) -> None:
        notify_event(ctx, scope)
        publish = gateways.push.publish_event
        if publish is None:
            return
        try:
            if not visible_here(ctx, event):
                return
        except Exception:  # noqa: BLE001 - a filter that cannot be evaluated here: not for this node
            log.debug("event %s: its filters could not be evaluated here", event.id, exc_info=True)
            return
        publish(event.name, json.dumps(event.to_api(), separators=(",", ":")).encode())

    events.listeners.append(on_event)

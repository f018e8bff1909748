"""``/v1/event``: Consul's user events (fire, list with blocking queries).

Where an event goes (docs/http-api.md, "Events"): fired at an edge it is the
site's (``?dc`` absent or the site) or the fleet's (``?dc=global``); fired at
the hub, the fleet's (no ``?dc``) or one site's (``?dc=<site>``). The agent's
:class:`~konsul.sync.events.EventLog` keeps it and the sync link carries it
(sync/events.py says how, and what happens under partition).

``GET /v1/event/list`` without ``?dc`` lists every event the agent has seen,
as Consul's does: at an edge its site's and the fleet's, in the order they
arrived; ``?dc=`` narrows it to one scope. At the hub it lists ``global``'s
unless ``?dc=<site>`` names a site. An edge lists the events its node would process, as a Consul agent does:
those whose node filter matches its node name and whose service (and tag)
filter matches one of the services registered on its node. The hub lists
every event it holds for the scope. ``?node=``, ``?service=`` and ``?tag=``
narrow a list to the events fired with a matching filter of that kind
(sync/events.py, ``list_filter``).
"""

from __future__ import annotations

from konsul.sync.errors import InvalidArgument
from konsul.sync.events import UserEvent, list_filter, matches_agent, uuid_index

from .authz import authorizer, filtered
from .blocking import block_until_changed, index_header
from .context import HttpContext
from .request import request
from .responses import Response, json_response
from .router import Routes

event_api = Routes("event")
ALL_SCOPES = "*"  # the feed key blocking lists without ?dc wait on


def notify_event(ctx: HttpContext, scope: str) -> None:
    """Wake the blocking lists a new event in ``scope`` answers."""
    ctx.feed.notify(scope, "events")
    ctx.feed.notify(ALL_SCOPES, "events")


def _scope_name(ctx: HttpContext) -> str:
    return ctx.scope(request.args.get("dc")).name  # 404 for a scope this agent does not hold


def _agent_services(ctx: HttpContext) -> list[tuple[str, tuple[str, ...]]]:
    site = ctx.replica.scopes.get(ctx.site)
    if site is None:
        return []
    return [(s.name, s.tags) for s in site.catalog.services() if s.node == ctx.node]


def visible_here(ctx: HttpContext, event: UserEvent) -> bool:
    """Whether this agent takes ``event``: an edge applies the filters, the hub keeps all."""
    if ctx.role != "edge" or not (event.node_filter or event.service_filter):
        return True
    return matches_agent(event, ctx.node, _agent_services(ctx))


@event_api.route("/v1/event/fire/<name>", methods=["PUT"])
async def fire(name: str) -> Response:
    ctx: HttpContext = request.ctx
    if ctx.events is None:
        raise InvalidArgument("events are not served by this agent")
    scope = _scope_name(ctx)
    body = await request.get_data(cache=True)
    event = ctx.events.fire(
        scope, name, body if body else None,
        request.args.get("node", ""), request.args.get("service", ""), request.args.get("tag", ""),
    )
    return json_response(event.to_api())


@event_api.route("/v1/event/list", methods=["GET"])
async def list_events() -> Response:
    ctx: HttpContext = request.ctx
    # No ?dc at an edge: everything it has seen (ALL_SCOPES wakes on any scope's
    # event); at the hub, global's.
    scope = _scope_name(ctx) if request.args.get("dc") or ctx.role != "edge" else None
    name = request.args.get("name", "")
    # A bad expression answers 400 before the query blocks.
    wanted = list_filter(request.args.get("node", ""), request.args.get("service", ""), request.args.get("tag", ""))
    allowed = authorizer()

    def matching() -> tuple[list[UserEvent], int]:
        found = [] if ctx.events is None else ctx.events.events(scope)
        found = [e for e in found if (not name or e.name == name) and wanted(e) and visible_here(ctx, e)]
        offered = len(found)
        return [e for e in found if allowed.allows("event", e.name, "read")], offered

    def current() -> int:
        # Consul's index for events: derived from the newest event's ID, not a counter.
        found, _ = matching()
        return uuid_index(found[-1].id) if found else 1

    await block_until_changed(current, lambda: ctx.feed.event(scope or ALL_SCOPES, "events"))
    found, offered = matching()
    headers = index_header(uuid_index(found[-1].id) if found else 1)
    return json_response([e.to_api() for e in found], headers=filtered(len(found), offered, headers))


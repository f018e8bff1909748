"""The routing table: method and path pattern to handler, 404 and 405 as Consul clients expect.

Each route module makes one :class:`Routes` and decorates its handlers with
``@routes.route(pattern, methods=[...])`` (or ``@routes.websocket(pattern)``);
the app joins them into one :class:`RouteTable`. A handler's endpoint, the
name authz.py keys permissions by, is ``"<routes name>.<function name>"``.

Patterns: ``<name>`` is one path segment (no ``/``, not empty);
``<any(a, b):name>`` one of the words given; ``<path:name>`` the rest of the
path, which may be empty or start with ``/`` (a Consul key such as
``/v1/kv//x`` is judged by the store's rules, not normalised away). Matching
is on the %-decoded path, exactly, with no redirect for a trailing or a
doubled slash. Static routes win over patterns that also match
(``/v1/acl/token/self`` over ``/v1/acl/token/<accessor>``), and a path that
matches only with other methods is a 405 with ``Allow``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Handler = Callable[..., Awaitable[Any]]

_PARAM = re.compile(r"<(?:(\w+)(?:\(([^)]*)\))?:)?(\w+)>")


@dataclass(frozen=True)
class Route:
    endpoint: str
    group: str  # the Routes it belongs to: "kv", "acl", ...; the audit log names its resource by it
    pattern: str
    methods: frozenset[str]  # {"WEBSOCKET"} for a WebSocket route
    handler: Handler
    regex: re.Pattern[str]
    static: bool  # no parameters: matched before every pattern
    rest: bool  # ends with a <path:...>: matched after every other


def compile_pattern(pattern: str) -> tuple[re.Pattern[str], int, bool]:
    """The regex of a route pattern, its number of parameters, and whether it takes the rest of the path."""
    parts, pos, count, rest = [], 0, 0, False
    for match in _PARAM.finditer(pattern):
        parts.append(re.escape(pattern[pos:match.start()]))
        converter, options, name = match.groups()
        if converter in (None, "string"):
            parts.append(f"(?P<{name}>[^/]+)")
        elif converter == "any":
            words = "|".join(re.escape(word.strip()) for word in (options or "").split(","))
            parts.append(f"(?P<{name}>{words})")
        elif converter == "path":
            parts.append(f"(?P<{name}>.*)")
            rest = True
        else:
            raise ValueError(f"unknown converter {converter!r} in route {pattern!r}")
        pos = match.end()
        count += 1
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts), re.DOTALL), count, rest


class Routes:
    """One module's routes (quart's Blueprint, for what konsul used of it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: list[Route] = []

    def route(self, pattern: str, methods: list[str] | tuple[str, ...] = ("GET",)) -> Callable[[Handler], Handler]:
        return self._add(pattern, frozenset(m.upper() for m in methods))

    def websocket(self, pattern: str) -> Callable[[Handler], Handler]:
        return self._add(pattern, frozenset({"WEBSOCKET"}))

    def _add(self, pattern: str, methods: frozenset[str]) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            regex, count, rest = compile_pattern(pattern)
            self.routes.append(Route(
                f"{self.name}.{handler.__name__}", self.name, pattern, methods, handler, regex, count == 0, rest,
            ))
            return handler

        return register


@dataclass(slots=True)  # made per request: not frozen, whose __init__ costs several times more
class Match:
    """What a request's method and path found: a route, or why none (404, or 405 and what is allowed)."""

    route: Route | None
    args: dict[str, str]
    allowed: frozenset[str] = frozenset()


class RouteTable:
    """Every route of an app, in the order they are tried."""

    def __init__(self, groups: list[Routes] | tuple[Routes, ...]) -> None:
        routes = [route for group in groups for route in group.routes]
        # Static first, then by fewer parameters, "rest of the path" last; else as registered.
        self.routes = sorted(routes, key=lambda r: (not r.static, r.rest, r.regex.groups))
        self._static: dict[str, list[Route]] = {}
        for route in self.routes:
            if route.static:
                self._static.setdefault(route.pattern, []).append(route)

    def endpoints(self) -> set[str]:
        return {route.endpoint for route in self.routes}

    def match(self, method: str, path: str) -> Match:
        """The route for ``method`` on ``path``; HEAD is served by GET routes."""
        wanted = "GET" if method == "HEAD" else method
        allowed: set[str] = set()
        for route in self._static.get(path, ()):
            if wanted in route.methods:
                return Match(route, {})
            allowed |= route.methods
        for route in self.routes:
            if route.static:
                continue
            found = route.regex.fullmatch(path)
            if found is None:
                continue
            if wanted in route.methods:
                return Match(route, found.groupdict())
            allowed |= route.methods
        return Match(None, {}, frozenset(allowed))


def allow_header(allowed: frozenset[str]) -> str:
    """``Allow`` for a 405: the methods the path takes (HEAD with GET, and OPTIONS, as served)."""
    methods = set(allowed) - {"WEBSOCKET"}
    if "GET" in methods:
        methods.add("HEAD")
    methods.add("OPTIONS")
    return ", ".join(sorted(methods))

"""The HTTP protocol adapter: a Consul-compatible API, an ASGI app of our own on hypercorn's protocol core."""

from .app import create_app
from .context import HttpContext

__all__ = ["HttpContext", "create_app"]

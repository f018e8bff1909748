"""The HTTP protocol adapter: a Consul-compatible API on quart-trio."""

from .app import create_app
from .context import HttpContext

__all__ = ["HttpContext", "create_app"]

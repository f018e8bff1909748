"""The CoAP device gateway (aiocoap behind the trio-asyncio boundary); see docs/coap.md."""

from __future__ import annotations

from .boundary import run_coap_gateway

__all__ = ["run_coap_gateway"]

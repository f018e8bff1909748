"""The MQTT device gateway: an embedded amqtt broker, or a client of an external broker.

``run_mqtt_gateway(gateways, addr)`` is what the edge agent starts:

- ``addr`` ``HOST:PORT`` runs the embedded broker there (port 0 picks one);
- ``addr`` ``mqtt://HOST:PORT`` attaches to an existing broker (mosquitto) as
  a client, with the same topic contract.

Module map: ``topics`` (the contract and access rules), ``frames`` (MQTT
framing, sans-IO), ``policy`` (refusals, metrics, payload rules), ``core``
(the agent's side, trio), ``connection`` and ``broker`` (the embedded broker,
asyncio), ``boundary`` (the one trio-asyncio crossing), ``external`` (the
external-broker client, trio). See docs/mqtt.md.
"""

from __future__ import annotations

import trio

from konsul.protocols.gateway import GatewayContext

__all__ = ["run_mqtt_gateway"]


async def run_mqtt_gateway(
    gateways: GatewayContext, addr: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve devices over MQTT until cancelled; reports where (``host:port`` or the broker URL)."""
    if "://" in addr:  # a URL: --mqtt-broker
        from .external import run_external

        await run_external(gateways, addr, task_status=task_status)
        return
    from .boundary import run_embedded

    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--mqtt-addr must be HOST:PORT, got {addr!r}")
    await run_embedded(gateways, host.strip("[]") or "127.0.0.1", int(port), task_status=task_status)

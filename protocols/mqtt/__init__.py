"""The MQTT device gateway: our own embedded broker (MQTT 3.1.1 and 5.0), or a client of an external broker.

``run_mqtt_gateway(gateways, addr, tls_addr=..., server_tls=...)`` is what the
edge agent starts:

- ``addr`` ``HOST:PORT`` runs the embedded broker there (port 0 picks one);
  ``tls_addr`` ``HOST:PORT`` with ``server_tls`` adds a listener for MQTT over
  TLS to the same broker (either address may be empty, not both);
- ``addr`` ``mqtt://HOST:PORT`` attaches to an existing broker (mosquitto) as
  a client, with the same topic contract; ``mqtts://`` over TLS, the broker's
  certificate checked against ``broker_ca`` (a CA file) or the system's CAs.

Module map: ``topics`` (the contract and access rules), ``codec`` (the MQTT
3.1.1 and 5.0 codec, sans-IO, shared with the simulator), ``policy``
(refusals, metrics, payload rules), ``core`` (the agent's side, trio),
``server`` (the embedded broker: a sans-IO core and its trio adapter),
``acks`` (acknowledgements in arrival order), ``external`` (the
external-broker client, trio). See docs/mqtt.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


# Nothing of the agent at import time: ``konsul.protocols.mqtt.codec`` is
# imported by the device simulator, which must not pull in trio's gateway.
if TYPE_CHECKING:
    import trio

    from konsul.protocols.gateway import GatewayContext
    from konsul.protocols.tls import ServerTls

__all__ = ["run_mqtt_gateway"]


async def run_mqtt_gateway(
    gateways: GatewayContext, addr: str, *, tls_addr: str = "", server_tls: ServerTls | None = None,
    broker_ca: str = "", task_status: trio.TaskStatus[dict[str, str]] | None = None,
) -> None:
    """Serve devices over MQTT until cancelled.

    Reports where: ``{"mqtt": host:port or the broker URL, "mqtts": host:port}``,
    each key only when served.
    """
    import trio

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    if "://" in addr:  # a URL: --mqtt-broker
        from .external import run_external

        await run_external(gateways, addr, ca=broker_ca, task_status=_Renamed(task_status, "mqtt"))
        return
    # Imported here, like the rest of the broker: the simulator imports this package
    # for its codec alone and must not pull in the agent (tests/simulator).
    from konsul.protocols.listen_addr import split_addr

    from .server.embedded import run_embedded
    from .server.listener import Listener

    listeners: list[Listener] = []
    names: list[str] = []
    if addr:
        listeners.append(Listener(*split_addr(addr, "--mqtt-addr")))
        names.append("mqtt")
    if tls_addr:
        if server_tls is None:
            raise ValueError("an MQTT TLS listener needs --tls-cert and --tls-key")
        listeners.append(Listener(*split_addr(tls_addr, "--mqtts-addr"), tls=server_tls))
        names.append("mqtts")
    if not listeners:
        raise ValueError("no MQTT address: give --mqtt-addr or --mqtts-addr")
    await run_embedded(gateways, listeners, task_status=_Renamed(task_status, *names))


class _Renamed:
    """A task status that reports ``{name: address}`` for what the gateway reports as one address or a list."""

    def __init__(self, status: trio.TaskStatus[dict[str, str]], *names: str) -> None:
        self.status = status
        self.names = names

    def started(self, bound: str | list[str]) -> None:
        self.status.started(dict(zip(self.names, [bound] if isinstance(bound, str) else bound)))

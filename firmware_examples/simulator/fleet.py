"""A fleet of simulated devices in one trio process: configuration, provisioning, start-up.

:func:`run_fleet` is the library entry point (``konsul sim``, ``konsul dev``
and the benchmarks use it): it starts the devices in its own nursery and
hands back the :class:`FleetCounters` they update. MQTT devices run on trio;
CoAP devices (aiocoap) on an asyncio loop in one thread, started only when
the fleet has CoAP devices (``coap_host`` says why).

With tokens (the default), each device is created first with
``PUT /v1/devices/<id>`` on the agent's HTTP API, which returns its token
once; a device that already exists gets a new token with ``?rotate-token``
(the simulator keeps no tokens between runs). Devices start as soon as their
token is known, so a large fleet comes up while the rest is provisioned.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .device import CONNECTING_CONCURRENCY, FleetCounters, SimDevice, seq_base

if TYPE_CHECKING:
    from .coap_host import CoapThread

PROTOCOLS = ("mqtt", "coap", "mixed")
PROVISIONING_CONCURRENCY = 8


@dataclass(frozen=True)
class FleetConfig:
    """What to simulate and where the agent is (addresses are ``host:port``)."""

    devices: int
    protocol: str = "mixed"  # mqtt, coap, or mixed (even-numbered devices MQTT, odd CoAP)
    http_addr: str = "127.0.0.1:8500"
    mqtt_addr: str = "127.0.0.1:1883"
    coap_addr: str = "127.0.0.1:5683"
    rate: float = 1.0  # samples per second per device, until desired state sets an interval
    disconnect_rate: float = 0.0  # mean random disconnects per device per minute
    anonymous: bool = False
    prefix: str = "sim-"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol is one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if self.devices < 0:
            raise ValueError("--devices is 0 or more")
        if not self.rate > 0:
            raise ValueError("--rate is a number of samples per second above 0")
        if self.disconnect_rate < 0:
            raise ValueError("--disconnect-rate is a number of disconnects per minute, 0 or more")

    def device_ids(self) -> list[tuple[str, str]]:
        """(device id, protocol) for every device, in start order."""
        width = max(4, len(str(self.devices - 1)))
        chosen = []
        for index in range(self.devices):
            protocol = self.protocol if self.protocol != "mixed" else ("mqtt", "coap")[index % 2]
            chosen.append((f"{self.prefix}{index:0{width}d}", protocol))
        return chosen


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"an address is host:port; got {addr!r}")
    return host.strip("[]"), int(port)


class ProvisioningError(Exception):
    """The agent's HTTP API did not give a device its token; says what to check."""


class Provisioner:
    """Creates devices on the agent's HTTP API and collects their tokens."""

    def __init__(self, http_addr: str) -> None:
        import httpx  # only a fleet with tokens needs it

        # An agent with ACLs on lets only a token with device:write create devices
        # (docs/acl.md): the one the konsul CLI takes from the environment.
        token = os.environ.get("KONSUL_HTTP_TOKEN") or os.environ.get("CONSUL_HTTP_TOKEN")
        headers = {"X-Consul-Token": token} if token else None
        self.client = httpx.AsyncClient(base_url=f"http://{http_addr}", timeout=30.0, headers=headers)
        self.limiter = trio.CapacityLimiter(PROVISIONING_CONCURRENCY)

    async def token(self, device_id: str) -> str:
        """A token for ``device_id``: created with it, or rotated if the device exists."""
        import httpx

        body = {"Type": "sim", "Tags": ["sim"]}
        try:
            async with self.limiter:
                response = await self.client.put(f"/v1/devices/{device_id}", json=body)
                response.raise_for_status()
                token = response.json().get("Token")
                if token is None:
                    response = await self.client.put(f"/v1/devices/{device_id}?rotate-token", json=body)
                    response.raise_for_status()
                    token = response.json().get("Token")
        except httpx.HTTPError as exc:
            raise ProvisioningError(
                f"cannot create device {device_id!r} at {self.client.base_url}: {exc} "
                "(is the edge running there? --http-addr; or run it with --allow-anonymous and use --anonymous)"
            ) from None
        if not token:
            raise ProvisioningError(f"the agent issued no token for {device_id!r} (PUT /v1/devices/{device_id}?rotate-token)")
        return token

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_fleet(
    config: FleetConfig,
    counters: FleetCounters | None = None,
    *,
    task_status: trio.TaskStatus[FleetCounters] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the fleet until cancelled; ``task_status.started`` gets its counters at once.

    Devices come up in the background (provisioning, then connecting), so a
    caller that needs them connected polls ``counters.connected``.
    """
    from .mqtt_device import run_mqtt_device

    counters = counters if counters is not None else FleetCounters()
    chosen = config.device_ids()
    counters.devices = len(chosen)
    seed = config.seed if config.seed is not None else random.randrange(1 << 32)
    base = seq_base()
    has_mqtt = any(protocol == "mqtt" for _, protocol in chosen)
    has_coap = any(protocol == "coap" for _, protocol in chosen)
    mqtt_host, mqtt_port = split_addr(config.mqtt_addr) if has_mqtt else ("", 0)
    coap_uri = coap_base_uri(config.coap_addr) if has_coap else ""
    provisioner = None if config.anonymous or not chosen else Provisioner(config.http_addr)
    connecting = trio.CapacityLimiter(CONNECTING_CONCURRENCY)

    async def start_device(device_id: str, protocol: str, coap: CoapThread | None) -> None:
        token = None if provisioner is None else await provisioner.token(device_id)
        device = SimDevice(
            device_id=device_id,
            protocol=protocol,
            token=token,
            interval=1.0 / config.rate,
            disconnect_rate=config.disconnect_rate,
            rng=random.Random(f"{seed}:{device_id}"),
            seq=base,
        )
        if protocol == "mqtt":
            await run_mqtt_device(device, mqtt_host, mqtt_port, counters.mqtt, connecting)
        else:
            assert coap is not None
            coap.start_device(device)  # from here on the device lives on the CoAP thread

    try:
        async with trio.open_nursery() as nursery:
            coap = None
            if has_coap:
                from .coap_host import CoapThread

                coap = await nursery.start(CoapThread(coap_uri, counters.coap).run)
            for device_id, protocol in chosen:
                nursery.start_soon(start_device, device_id, protocol, coap)
            task_status.started(counters)
    finally:
        if provisioner is not None:
            with trio.CancelScope(shield=True):
                await provisioner.aclose()


def coap_base_uri(coap_addr: str) -> str:
    host, port = split_addr(coap_addr)
    return f"coap://{host if ':' not in host else f'[{host}]'}:{port}"


async def report_periodically(counters: FleetCounters, every: float, emit=print) -> None:
    """Emit ``counters.summary()`` every ``every`` seconds, until cancelled."""
    while True:
        await trio.sleep(every)
        emit(counters.summary())

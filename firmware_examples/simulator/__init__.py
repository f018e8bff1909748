"""The fleet simulator: many simulated devices against a running agent (``konsul sim``).

Device-side code (DESIGN.md layers: ``firmware_examples/``), installed as
``konsul.simulator`` so that the ``konsul`` command and the benchmarks can
use it. It imports nothing from the agent's layers (``edge``, ``hub``,
``protocols``, ``sync``) but the MQTT codec, ``konsul.protocols.mqtt.codec``,
which is sans-IO and imports nothing of the agent (one codec per protocol,
DESIGN.md "Style"): it speaks to an agent only over the wire, as a device does.

Modules:

- ``device``: what a simulated device is and decides (samples, sequence
  numbers, desired state, backoff), and the fleet's counters;
- ``mqtt_device``: a device over MQTT, on trio;
- ``coap_device``: a device over CoAP, on asyncio (aiocoap);
- ``fleet``: configuration, provisioning of tokens, :func:`run_fleet`;
- ``command``: ``konsul sim``'s process: signals, duration, periodic summary.

Library use (the benchmarks)::

    async with trio.open_nursery() as nursery:
        counters = await nursery.start(run_fleet, FleetConfig(devices=100, anonymous=True))
        ...  # read counters.connected, counters.samples_acked, ...
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

from .device import FleetCounters
from .fleet import FleetConfig, run_fleet

__all__ = ["FleetConfig", "FleetCounters", "run_fleet"]

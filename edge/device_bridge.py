"""Where device traffic meets the edge's state: twins and telemetry.

The gateways (MQTT, CoAP) only validate and hand documents over, through the
hooks in ``GatewayContext.hooks`` (:class:`DeviceHooks`); the HTTP API reads
through ``HttpContext``. This module fills both:

- telemetry (``ingest_telemetry``, the buffer's own ingest, for batches; ``on_telemetry`` for one) goes
  to the :class:`TelemetryBuffer`, and the call returns once it is durable;
- reported state (``on_reported``) is merged into the twin;
- desired state is read by ``desired_state`` (CoAP GETs), and every durable
  change of it, made here or arriving from the hub, is pushed to the device:
  through ``GatewayContext.push`` the MQTT gateway republishes the retained
  desired topic, the CoAP gateway notifies observers. On start every device's desired state is published
  once, so a device that connects to a restarted edge still finds it.

It also runs the sweep that deletes anonymous devices unseen for too long
(``GatewayContext.anonymous``), for whichever gateways registered them.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from konsul.protocols.gateway import DeviceHooks, GatewayContext
from konsul.sync.errors import NotFound
from konsul.sync.scope import Scope
from konsul.sync.telemetry import Sample
from konsul.sync.twin import parse_twin_key

from .telemetry_buffer import TelemetryBuffer

log = logging.getLogger("konsul.edge.devices")


class DeviceBridge:
    """Twin and telemetry hooks of one edge site."""

    def __init__(self, scope: Scope, buffer: TelemetryBuffer) -> None:
        self.scope = scope
        self.buffer = buffer
        self._changed: set[str] = set()
        self._wake = trio.Event()
        self.gateways: GatewayContext | None = None

    # -- hooks for the gateways ----------------------------------------------------

    def install(self, gateways: GatewayContext) -> None:
        self.gateways = gateways
        gateways.hooks = DeviceHooks(
            ingest_telemetry=self.buffer.ingest,
            on_telemetry=self.on_telemetry,
            on_reported=self.on_reported,
            desired_state=self.desired_state,
        )

    async def on_telemetry(self, device_id: str, document: Any) -> None:
        await self._ingest_all([(device_id, document)])

    async def on_reported(self, device_id: str, document: Any, replace: bool = False) -> None:
        await self.scope.write_twin("reported", device_id, document, replace=replace)

    def desired_state(self, device_id: str) -> dict[str, Any]:
        return self.scope.devices.twin.document("desired", device_id)

    # -- TelemetrySource for the HTTP API --------------------------------------------

    async def ingest(self, site: str, items: list[tuple[str, Any]]) -> None:
        if site != self.scope.name:
            raise NotFound(f"telemetry of {site!r} is ingested at its own edge")
        await self._ingest_all(items)

    async def _ingest_all(self, items: list[tuple[str, Any]]) -> None:
        """Ingest durably; raises the first sample's refusal, if any."""
        for error in await self.buffer.ingest(items):
            if error is not None:
                raise error

    async def samples(
        self, devices: list[tuple[str, str]], since_ms: int | None, until_ms: int | None, limit: int
    ) -> list[tuple[str, Sample]]:
        found = []
        for site, device in devices:
            if site == self.scope.name:
                found.extend((site, s) for s in await self.buffer.samples(device, since_ms, until_ms, limit))
        found.sort(key=lambda pair: (pair[1].time_ms, pair[1].device, pair[1].seq))
        return found[-limit:]

    # -- desired state to devices ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Push desired state to devices (and expire anonymous ones) until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.gateways is not None:
                nursery.start_soon(self.gateways.anonymous.run)
            await nursery.start(self._push_desired)
            task_status.started()

    async def _push_desired(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.scope.listeners.append(self._on_change)
        try:
            self._changed.update(self.scope.devices.twin.devices("desired"))
            self._wake.set()
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                changed, self._changed = self._changed, set()
                for device_id in sorted(changed):
                    self._push(device_id)
                await trio.sleep(0)
        finally:
            self.scope.listeners.remove(self._on_change)

    def _on_change(self, collection: str, keys: set[str]) -> None:
        if collection != "devices":
            return
        for key in keys:
            parsed = parse_twin_key(key)
            if parsed is not None and parsed[0] == "desired":
                self._changed.add(parsed[1])
            elif key.startswith("d/"):
                self._changed.add(key[2:])  # created or deleted: (re)publish or clear
        if self._changed:
            self._wake.set()

    def _push(self, device_id: str) -> None:
        if self.gateways is None:
            return
        twin = self.scope.devices.twin
        if self.scope.devices.get(device_id) is None:
            document = None  # deleted: clear the retained message
        elif twin.has_side("desired", device_id):
            document = twin.document("desired", device_id)  # {} once every field is removed
        else:
            return  # a new device without desired state: nothing to say yet
        push = self.gateways.push
        try:
            publish = push.publish_desired
            if publish is not None:
                publish(device_id, document)
            notify = push.notify_desired
            if notify is not None:
                notify(device_id)
        except Exception:
            log.exception("could not push the desired state of %s", device_id)

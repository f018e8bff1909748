"""What a device protocol gateway (MQTT, CoAP) needs from the agent.

Gateways turn device traffic into calls on the state API. They share one
identity rule: the device id is the client id (MQTT) or endpoint name (CoAP);
the credential is the token the registry issued. Anonymous devices are
admitted only with ``--allow-anonymous``, and are then registered on first
contact, so every device that talks to an edge appears in ``/v1/devices``.

Anonymous registrations are durable records synced to the hub, made by
whoever can reach the port, so they are bounded (:class:`AnonymousDevices`):
at most ``limits.anonymous_devices`` exist, a new one past that is refused,
and one not seen for ``limits.anonymous_device_expiry_s`` is deleted. When a
device was last seen is presence (memory, DESIGN.md decision 5), never a
field of the record: after a restart, the start counts as the last contact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from konsul.sync.devices import DeviceRecord, PresenceTable, check_device_id
from konsul.sync.errors import InvalidArgument, KonsulError, NotFound
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.scope import Scope

from .admission import NetworkLimits
from .device_access import DeviceAccess

if TYPE_CHECKING:
    from konsul.sync.acl_resolver import AclResolver

    from .audit import AuditLog
    from .rate_limit import TokenBuckets

log = logging.getLogger("konsul.gateway")

DEFAULT_MAX_PAYLOAD = 256 * 1024
ANONYMOUS_TYPE = "anonymous"  # the type of devices registered on first anonymous contact


SWEEP_INTERVAL_MAX = 300.0  # seconds between sweeps for expired anonymous devices, at most
RECOUNT_INTERVAL = 5.0  # at the cap, the records are counted again at most this often
SWEEP_BATCH = 500  # deletions per sweep, so one sweep never holds the store for long


class AuthError(KonsulError):
    code = "unauthorized"
    status = 401


def no_desired_state(_device_id: str) -> dict[str, Any]:
    """The desired state of a device when no agent serves twins: none."""
    return {}


# A document hook is a plain function or a trio async function of (device_id, document).
DocumentHook = Callable[[str, Any], Awaitable[None] | None]
# Reported state: (device_id, document, replace); replace=True for a PUT, which replaces the
# reported side instead of merging into it.
ReportedHook = Callable[[str, Any, bool], Awaitable[None] | None]
# Telemetry in batches: [(device_id, document)] -> one refusal (or None) per item, once durable.
TelemetryIngest = Callable[[list[tuple[str, Any]]], Awaitable[list[KonsulError | None]]]


@dataclass
class DeviceHooks:
    """What the agent does with what devices send: the gateways call these.

    The edge installs them (edge/device_bridge.py); a gateway run without an
    agent behind it (tests) leaves a hook None and the gateway then only
    validates and counts, and serves no desired state.
    """

    ingest_telemetry: TelemetryIngest | None = None
    on_telemetry: DocumentHook | None = None
    on_reported: ReportedHook | None = None
    desired_state: Callable[[str], dict[str, Any]] = no_desired_state

    def on_document(self, kind: str) -> Callable[..., Awaitable[None] | None] | None:
        """The hook for a device's ``telemetry`` or ``reported`` document, if installed."""
        return self.on_telemetry if kind == "telemetry" else self.on_reported if kind == "reported" else None


@dataclass
class DevicePush:
    """How the agent reaches devices: each running gateway installs its part and removes it when it stops.

    The edge calls them when a device's desired state changes durably
    (edge/device_bridge.py) and when a user event arrives (edge/event_delivery.py).
    """

    # MQTT: (device_id, desired state or None once the device is deleted) -> the retained desired topic.
    publish_desired: Callable[[str, dict[str, Any] | None], None] | None = None
    # CoAP: device_id -> its observers of /devices/<id>/desired are notified.
    notify_desired: Callable[[str], None] | None = None
    # MQTT: (event name, JSON payload) -> konsul/v1/events/<name>.
    publish_event: Callable[[str, bytes], None] | None = None


class AnonymousDevicesFull(KonsulError):
    """No room for another anonymous device (MQTT CONNACK 3, CoAP 5.03)."""

    code = "anonymous_devices_full"
    status = 503


@dataclass
class GatewayContext:
    """The agent's state as device gateways see it.

    Args:
        replica: the durable state.
        site: this edge's scope.
        presence: who is online, over what.
        allow_anonymous: admit devices without credentials.
        registry: the Prometheus registry to add gateway metrics to.
        max_payload: the largest message a device may send, in bytes.
        limits: per-source and total bounds (connections, observers, anonymous devices).
        hooks: what the agent does with device documents (telemetry, reported, desired).
        push: how the agent reaches devices, as the running gateways install it.
    """

    replica: Replica
    site: str
    presence: PresenceTable
    allow_anonymous: bool = False
    registry: Any = None
    max_payload: int = DEFAULT_MAX_PAYLOAD
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    # Access control (docs/acl.md): policies a device's token links. None: made
    # in __post_init__, enforcing.
    acl: AclResolver | None = None
    audit: AuditLog | None = None  # None: no audit log
    # Messages per device, for both MQTT and CoAP. None: each gateway makes its
    # own from ``limits`` (device_message_limit), labelled with its interface.
    device_rate: TokenBuckets | None = None
    hooks: DeviceHooks = field(default_factory=DeviceHooks)
    push: DevicePush = field(default_factory=DevicePush)
    anonymous: AnonymousDevices = field(init=False, repr=False)
    device_access: DeviceAccess = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.anonymous = AnonymousDevices(self)
        if self.acl is None:
            from konsul.sync.acl_resolver import AclResolver

            self.acl = AclResolver(self.replica, self.site)
        self.device_access = DeviceAccess(self)

    @property
    def scope(self) -> Scope:
        return self.replica.scope(self.site)

    @property
    def global_scope(self) -> Scope:
        return self.replica.scope(GLOBAL_SCOPE)

    async def authenticate(self, device_id: str, token: str | None) -> DeviceRecord:
        """The device's record if its credentials hold; raises :class:`AuthError`.

        With ``allow_anonymous`` a device without a token is admitted and, if
        unknown, registered with the default allowance (read-only KV).
        """
        try:
            check_device_id(device_id)
        except InvalidArgument as error:
            raise AuthError(str(error)) from None
        devices = self.scope.devices
        if token:
            record = devices.verify(device_id, token)
            if record is None:
                raise AuthError(f"wrong credentials for device {device_id!r}")
            return record
        if not self.allow_anonymous:
            raise AuthError(f"device {device_id!r} gave no token and anonymous devices are not allowed")
        record = devices.get(device_id)
        if record is not None and record.type != ANONYMOUS_TYPE:
            # A device someone registered has credentials: claiming its id
            # without them must not get its allowances, anonymous mode or not.
            raise AuthError(f"device {device_id!r} is registered with a token; give it")
        if record is None:
            record = await self.anonymous.register(device_id)
        return record


class AnonymousDevices:
    """The bound and the expiry of devices registered on anonymous first contact.

    The number of anonymous records is counted from the registry at the first
    registration and at every sweep, and kept up to date in between; records
    deleted by someone else (HTTP, the hub) are noticed at the next count, so
    at the cap the records are counted again before a device is refused.
    """

    def __init__(self, ctx: GatewayContext, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.clock = clock
        self.started = clock()  # the last contact of every record already stored
        self.known: int | None = None  # anonymous records in the scope, as last counted
        self._counted_at = float("-inf")
        self._registering: dict[str, trio.Event] = {}  # device ids being written now
        registry = ctx.registry if ctx.registry is not None else CollectorRegistry(auto_describe=False)
        self.gauge = Gauge("konsul_anonymous_devices", "Devices registered on anonymous first contact, as last counted", registry=registry)
        self.registered = Counter(
            "konsul_anonymous_devices_registered", "Devices registered on anonymous first contact", registry=registry
        )
        self.refused = Counter(
            "konsul_anonymous_devices_refused", "New anonymous devices refused: the cap was reached", registry=registry
        )
        self.expired = Counter(
            "konsul_anonymous_devices_expired", "Anonymous devices deleted after the expiry unseen", registry=registry
        )

    def count(self) -> int:
        """Count the anonymous records in the scope (a scan of the registry)."""
        self.known = sum(1 for record in self.ctx.scope.devices.records() if record.type == ANONYMOUS_TYPE)
        self._counted_at = self.clock()
        self.gauge.set(self.known)
        return self.known

    async def register(self, device_id: str) -> DeviceRecord:
        """Register an unknown device without credentials; :class:`AnonymousDevicesFull` past the cap."""
        pending = self._registering.get(device_id)
        if pending is not None:  # the same device, twice at once: one write, both get its record
            await pending.wait()
            record = self.ctx.scope.devices.get(device_id)
            if record is None:
                raise AuthError(f"device {device_id!r} could not be registered; try again")
            return record
        cap = self.ctx.limits.anonymous_devices
        if self.known is None:
            self.count()
        if self.known + len(self._registering) >= cap and self.clock() - self._counted_at >= RECOUNT_INTERVAL:
            self.count()  # deletions made elsewhere since the last count free places
        if self.known + len(self._registering) >= cap:
            self.refused.inc()
            raise AnonymousDevicesFull(
                f"{self.known} anonymous devices are registered, the most this edge takes; "
                "give the device a token (PUT /v1/devices/<id>) or wait for unused ones to expire"
            )
        done = self._registering[device_id] = trio.Event()  # a place is taken before the write yields
        try:
            record, _token = await self.ctx.scope.put_device(DeviceRecord(device_id, type=ANONYMOUS_TYPE))
        finally:
            del self._registering[device_id]
            done.set()
        self.known += 1
        self.gauge.set(self.known)
        self.registered.inc()
        log.info("registered anonymous device %s", device_id)
        return record

    def expired_ids(self, now: float) -> list[str]:
        """Anonymous devices unseen for longer than the expiry, and not connected now."""
        cutoff = now - self.ctx.limits.anonymous_device_expiry_s
        presence = self.ctx.presence.devices
        found, count = [], 0
        for record in self.ctx.scope.devices.records():
            if record.type != ANONYMOUS_TYPE:
                continue
            count += 1
            seen = presence.get(record.device_id)
            if seen is not None and seen.online and seen.protocol == "mqtt":
                continue  # a held connection is contact, however long ago it began
            last = max(self.started, seen.last_seen or 0.0) if seen is not None else self.started
            if last < cutoff:
                found.append(record.device_id)
        self.known, self._counted_at = count, self.clock()
        self.gauge.set(count)
        return found

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete the expired anonymous devices (at most :data:`SWEEP_BATCH`); their ids."""
        expired = self.expired_ids(self.clock() if now is None else now)[:SWEEP_BATCH]
        deleted = []
        for device_id in expired:
            record = self.ctx.scope.devices.get(device_id)
            if record is None or record.type != ANONYMOUS_TYPE:
                continue  # deleted or registered with a token meanwhile
            try:
                await self.ctx.scope.delete_device(device_id)
            except NotFound:
                continue
            self.ctx.presence.forget(device_id)
            deleted.append(device_id)
        if deleted:
            self.known = max(0, (self.known or 0) - len(deleted))
            self.gauge.set(self.known)
            self.expired.inc(len(deleted))
            log.info(
                "deleted %d anonymous devices unseen for %gs (%s%s)",
                len(deleted), self.ctx.limits.anonymous_device_expiry_s, ", ".join(deleted[:5]),
                ", ..." if len(deleted) > 5 else "",
            )
        return deleted

    async def run(self) -> None:
        """Sweep until cancelled, often enough to keep within a tenth of the expiry."""
        interval = min(max(self.ctx.limits.anonymous_device_expiry_s / 10, 1.0), SWEEP_INTERVAL_MAX)
        while True:
            await trio.sleep(interval)
            try:
                await self.sweep()
            except KonsulError as error:  # the store refused: try again next time
                log.error("could not delete expired anonymous devices: %s", error)

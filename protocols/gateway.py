"""What a device protocol gateway (MQTT, CoAP) needs from the agent.

Gateways turn device traffic into calls on the state API. They share one
identity rule: the device id is the client id (MQTT) or endpoint name (CoAP);
the credential is the token the registry issued. Anonymous devices are
admitted only with ``--allow-anonymous``, and are then registered on first
contact, so every device that talks to an edge appears in ``/v1/devices``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from konsul.sync.devices import DeviceRecord, PresenceTable, check_device_id
from konsul.sync.errors import InvalidArgument, KonsulError
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.scope import Scope

from .admission import NetworkLimits

log = logging.getLogger("konsul.gateway")

DEFAULT_MAX_PAYLOAD = 256 * 1024
ANONYMOUS_TYPE = "anonymous"  # the type of devices registered on first anonymous contact


class AuthError(KonsulError):
    code = "unauthorized"
    status = 401


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
    """

    replica: Replica
    site: str
    presence: PresenceTable
    allow_anonymous: bool = False
    registry: Any = None
    max_payload: int = DEFAULT_MAX_PAYLOAD
    extras: dict[str, Any] = field(default_factory=dict)
    limits: NetworkLimits = field(default_factory=NetworkLimits)

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
            record, _token = await self.scope.put_device(DeviceRecord(device_id, type=ANONYMOUS_TYPE))
            log.info("registered anonymous device %s", device_id)
        return record

"""What a device may do: its record's shorthands plus its linked ACL policies.

A device is a principal (docs/acl.md, "Devices as principals"). Its token is
checked by ``GatewayContext.authenticate``; what it may then do is an
:class:`~konsul.sync.acl_rules.Authorizer` made of

- its record's shorthands: ``KVRead`` prefixes as ``key_prefix`` read rules,
  ``KVWrite`` as write rules, and ``device "<own id>"`` write (a device always
  reports its own twin and telemetry, and reads its own desired state);
- the rules of the policies its record links (``Policies``), looked up in the
  replicated ACL records through the agent's resolver, so a device may be
  given, e.g., ``key "sensors/*/cfg"`` write or ``device_prefix "pump-"`` write.

With ACLs off (``--acl off``) the record's prefix lists decide exactly as
before ACLs existed: :class:`LegacyRights`.

Cost: a device's rights are cached per device id and checked against the
record's stamp and the ACL registries' generations, so a check on every
message is a dict lookup and a tuple compare, then the authorizer's own
memoised lookup. A changed record (new policies, new prefixes) or any ACL
change (a policy edited or deleted) is seen on the device's next message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from konsul.sync.acl import MANAGEMENT_POLICY_ID
from konsul.sync.acl_rules import Authorizer, PolicyRules, shorthand_rules
from konsul.sync.replica import GLOBAL_SCOPE

from .access import count_refusal
from .rate_limit import TokenBuckets, device_message_limit

if TYPE_CHECKING:
    from konsul.sync.devices import DeviceRecord

    from .gateway import GatewayContext

_CACHE_LIMIT = 16_384  # devices whose rights are kept (a forgotten one is rebuilt, never refused)
RATE_AUDIT_INTERVAL = 1.0  # seconds: one audit event per device and interval for messages over its rate


class Rights(Protocol):
    """What one device may do, as the gateways ask it."""

    device_id: str

    def allows(self, resource: str, name: str, access: str) -> bool: ...

    def may_read_under(self, prefix: str) -> bool: ...

    def denial(self, resource: str, name: str, access: str) -> str: ...


class LegacyRights:
    """The rights of a device with ACLs off: its ``KVRead``/``KVWrite`` prefixes and its own topics."""

    __slots__ = ("record", "device_id")

    def __init__(self, record: DeviceRecord) -> None:
        self.record = record
        self.device_id = record.device_id

    def allows(self, resource: str, name: str, access: str) -> bool:
        if resource == "key":
            return self.record.may_write(name) if access == "write" else self.record.may_read(name)
        if resource == "device":
            return name == self.device_id
        return False

    def may_read_under(self, prefix: str) -> bool:
        readable = self.record.kv_read + self.record.kv_write
        return any(p.startswith(prefix) or prefix.startswith(p) for p in readable)

    def denial(self, resource: str, name: str, access: str) -> str:
        who = f"device {self.device_id!r}" if self.device_id else "an unnamed anonymous client"
        if resource == "key":
            grant = "KVWrite" if access == "write" else "KVRead"
            allowed = list(self.record.kv_write if access == "write" else self.record.kv_read + self.record.kv_write)
            return f"{who} may not {access} KV key {name!r} ({grant} {allowed})"
        return f"{who} may not {access} device {name!r}'s topics or resources"


class PolicyRights:
    """The rights of a device with ACLs on: an authorizer of its shorthands and policies."""

    __slots__ = ("device_id", "authorizer", "rules")

    def __init__(self, device_id: str, authorizer: Authorizer, rules: list[PolicyRules]) -> None:
        self.device_id = device_id
        self.authorizer = authorizer
        self.rules = rules

    def allows(self, resource: str, name: str, access: str) -> bool:
        return self.authorizer.allows(resource, name, access)

    def may_read_under(self, prefix: str) -> bool:
        """Whether some key starting with ``prefix`` may be read (a wildcard subscription's test).

        Every message is checked again on delivery; this only refuses a filter
        that could never deliver anything.
        """
        if self.authorizer.allows("key", prefix, "read"):
            return True
        for policy in self.rules:
            for rule in policy.rules:
                if rule.resource != "key" or not 1 <= rule.level <= 3:  # read, list, write; not deny
                    continue
                head = rule.segment.split("*", 1)[0] if rule.glob else rule.segment
                if head.startswith(prefix) or (prefix.startswith(head) and (rule.prefix or rule.glob)):
                    return True
        return False

    def denial(self, resource: str, name: str, access: str) -> str:
        who = f"device {self.device_id!r}" if self.device_id else "an unnamed anonymous client"
        what = f"KV key {name!r}" if resource == "key" else f"device {name!r}"
        grant = (
            f'KVWrite/KVRead or a policy with key_prefix {{ policy = "{access}" }}' if resource == "key"
            else f'a policy with device "{name}" {{ policy = "{access}" }}'
        )
        return f"{who} lacks permission '{resource}:{access}' on {what}; give the device {grant}"


def _version(record: DeviceRecord) -> tuple:
    """What a device's rights depend on in its record: its stamp (a stored record), else its fields."""
    if record.stamp is not None:
        return (record.stamp,)
    return (None, record.kv_read, record.kv_write, record.policy_ids)  # the unnamed CoAP caller, tests


class DeviceAccess:
    """Rights of devices, message rate limits and audit events, for one edge's gateways."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        # device id -> (record, its version, ACL generations, rights)
        self._cache: dict[str, tuple[DeviceRecord, tuple, tuple[int, int], PolicyRights]] = {}
        self._rates: dict[str, TokenBuckets] = {}
        # (interface, device) -> [when its last rate_limited event was recorded, refusals since]
        self._rate_audits: dict[tuple[str, str], list] = {}

    @property
    def enabled(self) -> bool:
        return self.ctx.acl is not None and self.ctx.acl.enabled

    # -- rights ----------------------------------------------------------------------

    def rights(self, record: DeviceRecord) -> Rights:
        """What ``record``'s device may do now (cached; see the module doc)."""
        acl = self.ctx.acl
        if acl is None or not acl.enabled:
            return LegacyRights(record)
        # The ACL records this edge enforces: global's and its own site's (as AclResolver.registries).
        scopes = self.ctx.replica.scopes
        top, own = scopes.get(GLOBAL_SCOPE), scopes.get(self.ctx.site)
        generation = (top.acl.generation if top is not None else 0, own.acl.generation if own is not None else 0)
        cached = self._cache.get(record.device_id)
        if cached is not None and cached[2] == generation and (cached[0] is record or cached[1] == _version(record)):
            return cached[3]  # the gateways hold one record object per version: usually the 'is'
        rights = self._build(record)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[record.device_id] = (record, _version(record), generation, rights)
        return rights

    def _build(self, record: DeviceRecord) -> PolicyRights:
        own = (record.device_id,) if record.device_id else ()
        rules = [shorthand_rules(record.kv_read, record.kv_write, own)]
        principal = f"device:{record.device_id}" if record.device_id else "anonymous"
        if MANAGEMENT_POLICY_ID in record.policy_ids:
            return PolicyRights(record.device_id, Authorizer(management=True, principal=principal), rules)
        for policy_id in record.policy_ids:
            policy = self.ctx.acl.policy(policy_id)
            if policy is None or not policy.applies_in(self.ctx.site):
                continue  # a deleted policy grants nothing; one for other sites nothing here
            rules.append(self.ctx.acl.parsed_rules(policy))
        return PolicyRights(record.device_id, Authorizer(rules, principal=principal), rules)

    # -- message rates -------------------------------------------------------------------

    def rate(self, interface: str) -> TokenBuckets:
        """The per-device message limit of ``interface`` (``mqtt`` or ``coap``).

        One bucket table per interface (so refusals are counted under the
        interface they happened on): a device using both MQTT and CoAP gets the
        rate on each. ``ctx.device_rate``, when given, serves both.
        """
        if self.ctx.device_rate is not None:
            return self.ctx.device_rate
        found = self._rates.get(interface)
        if found is None:
            found = self._rates[interface] = device_message_limit(self.ctx.limits, interface, self.ctx.registry)
        return found

    # -- audit -------------------------------------------------------------------------------

    def audit_rate_limited(self, device_id: str, source: str, interface: str, resource: str, detail: str) -> None:
        """Audit a message refused by the rate, at most once per device and second.

        A flood is what the rate refuses: one event per dropped message would
        fill the audit queue and push out everyone else's events (the queue
        drops when full). The first refusal is recorded at once; later ones
        within the interval are counted and the count goes in the next event.
        Every refusal is counted in ``konsul_rate_limited_total`` regardless.
        """
        if self.ctx.audit is None:
            return
        now = time.monotonic()
        key = (interface, device_id)
        seen = self._rate_audits.get(key)
        if seen is not None and now - seen[0] < RATE_AUDIT_INTERVAL:
            seen[1] += 1
            return
        suppressed = 0 if seen is None else seen[1]
        if len(self._rate_audits) >= _CACHE_LIMIT:
            self._rate_audits.clear()
        self._rate_audits[key] = [now, 0]
        more = f" (and {suppressed} more refused since the last event)" if suppressed else ""
        self.audit(device_id, source, interface, "publish" if interface == "mqtt" else "request", resource,
                   "rate_limited", f"rate_limited: {detail}{more}")

    def audit(
        self, device_id: str | None, source: str, interface: str, operation: str, resource: str,
        result: str = "allowed", reason: str = "",
    ) -> None:
        """One audit event (nothing without an audit log); a denial is also counted."""
        if result == "denied":
            count_refusal(self.ctx.registry, interface, reason.split(":", 1)[0] or "denied")
        audit = self.ctx.audit
        if audit is not None:
            audit.record(
                accessor=device_id or None, source=source, interface=interface, operation=operation,
                resource=resource, result=result, reason=reason,
            )

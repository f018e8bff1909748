"""An agent's access-control pieces, made once from its configuration.

Every interface of an agent (HTTP, MQTT, CoAP) shares one resolver (tokens
and policies from the replicated state), one audit log and one set of rate
limits, so a revoked token or an exhausted bucket counts the same everywhere.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from konsul.sync import acl
from konsul.sync.acl import MANAGEMENT_POLICY_ID, check_uuid, hash_secret
from konsul.sync.acl_resolver import AclResolver
from konsul.sync.replica import GLOBAL_SCOPE, Replica

from .audit import AuditLog, open_audit_log
from .rate_limit import HttpRateLimits

log = logging.getLogger("konsul.acl")

# AccessorIDs of initial management tokens are derived from the scope and the
# secret's hash, so an agent restarted with the same flag finds its token
# instead of making another, and nothing about the secret can be read back.
_INITIAL_NAMESPACE = uuid.UUID("6f1c3c1e-6b0e-4d5e-9a63-0e7a2f6c1b3d")


_REFUSALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def count_refusal(registry: Any, interface: str, reason: str) -> None:
    """``konsul_acl_refusals_total{interface,reason}``: a request refused for who sent it.

    ``reason`` is the refusal's code: ``permission_denied`` (a known token or
    device without the right), ``acl_not_found`` (an unknown or revoked token),
    ``unauthorized`` (a device's wrong credentials). One counter per registry.
    """
    if registry is None:
        return
    counter = _REFUSALS.get(registry)
    if counter is None:
        from prometheus_client import Counter

        counter = _REFUSALS[registry] = Counter(
            "konsul_acl_refusals", "Requests refused for their token or credentials, by interface and reason",
            ["interface", "reason"], registry=registry,
        )
    counter.labels(interface, reason).inc()


@dataclass
class AccessControl:
    """What an agent's interfaces consult: who a token is, the audit log, the rate limits."""

    acl: AclResolver
    audit: AuditLog | None
    http_rate: HttpRateLimits

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The audit log's writer (until cancelled); returns at once without a log."""
        if self.audit is None:
            task_status.started()
            return
        try:
            await self.audit.run(task_status=task_status)
        finally:
            self.audit.close()


def open_access_control(
    replica: Replica, site: str, data_dir: Path | str, *, enabled: bool, audit_log: str,
    audit_max_bytes: int, audit_keep: int, limits: Any, registry: Any,
) -> AccessControl:
    """The agent's :class:`AccessControl`; ``site`` is an edge's site, ``global`` at the hub."""
    if not enabled:
        log.warning(
            "ACLs are off (--acl off): anyone who reaches this agent's ports may read, write and delete "
            "everything; use this only on a closed test bench"
        )
    return AccessControl(
        AclResolver(replica, site, enabled=enabled),
        open_audit_log(audit_log, Path(data_dir), audit_max_bytes, audit_keep, registry),
        HttpRateLimits.from_limits(limits, registry),
    )


async def ensure_initial_management(replica: Replica, site: str, secret: str) -> str:
    """Make sure a management token with ``secret`` exists; returns its AccessorID.

    Consul's ``acl.tokens.initial_management``: an operator (or ``konsul dev``,
    or a deployment tool) names the first management secret instead of calling
    bootstrap. At the hub the token is global; at an edge it is local to the
    edge's site, so each agent can be given one without the edge writing
    fleet-wide ACL records (which only the hub makes once a hub exists).
    """
    check_uuid(secret, "the initial management token")
    scope = replica.scope(site)
    accessor = str(uuid.uuid5(_INITIAL_NAMESPACE, f"{site}:{hash_secret(secret)}"))
    existing = scope.acl.token_by_secret_hash(hash_secret(secret))
    if existing is not None:
        return existing.accessor_id
    await acl.create_token(
        scope, "Initial Management Token", [MANAGEMENT_POLICY_ID], local=site != GLOBAL_SCOPE,
        accessor_id=accessor, secret=secret,
    )
    log.info("made the initial management token (AccessorID %s) in %s", accessor, site)
    return accessor

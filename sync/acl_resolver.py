"""Who a request is: a secret resolved to its token and a cached :class:`Authorizer`.

Lookups read the replicated records (``acl.py``) of ``global`` and of the
agent's own site, so an edge answers from its own replica, hub or no hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .acl import (
    ANONYMOUS_ACCESSOR,
    GLOBAL_SCOPE,
    MANAGEMENT_POLICY_ID,
    AclNotFound,
    AclPolicy,
    AclRegistry,
    AclToken,
    hash_secret,
)
from .acl_rules import DENY_ALL, MANAGEMENT, Authorizer, PolicyRules, parse_rules
from .errors import InvalidArgument
from .hlc import Stamp

if TYPE_CHECKING:
    from .replica import Replica

_RULES_CACHE_LIMIT = 4096
_PRINCIPAL_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: its token (None for anonymous), where it lives, what it may do."""

    token: AclToken | None
    scope: str
    authorizer: Authorizer

    @property
    def accessor_id(self) -> str:
        return self.token.accessor_id if self.token is not None else ANONYMOUS_ACCESSOR


class AclResolver:
    """Turns a request's secret into a :class:`Principal`, from the replicated records.

    Global tokens are looked up in ``global``, site-local ones in the agent's
    own site (at the hub, the site a request names). An authorizer is built
    once per token and cached until any ACL record changes on this replica; a
    resolve then costs a SHA-256 of the secret and a few dict lookups.

    Args:
        replica: the agent's state.
        site: the agent's own site (an edge's ``--site``; the hub passes ``global``).
        enabled: with ACLs off every request acts with management rights.
    """

    def __init__(self, replica: Replica, site: str, enabled: bool = True) -> None:
        self.replica = replica
        self.site = site
        self.enabled = enabled
        # (site, secret) -> (registry generations, principal); "" is anonymous
        self._principals: dict[tuple[str, str], tuple[tuple[int, ...], Principal]] = {}
        self._rules: dict[tuple[str, Stamp | None], PolicyRules] = {}

    def registries(self, site: str | None = None) -> list[AclRegistry]:
        """Where tokens are looked up: ``global`` first, then the site's own scope."""
        scopes = self.replica.scopes
        found = [scope.acl for scope in (scopes.get(GLOBAL_SCOPE),) if scope is not None]
        site = site or self.site
        if site != GLOBAL_SCOPE:
            scope = scopes.get(site)
            if scope is not None:
                found.append(scope.acl)
        return found

    def principal(self, secret: str | None, site: str | None = None) -> Principal:
        """Who ``secret`` is; raises :class:`AclNotFound` for an unknown or revoked secret.

        No secret at all means the anonymous token (denied everything until an
        operator gives the anonymous token policies).
        """
        if not self.enabled:
            return Principal(None, GLOBAL_SCOPE, MANAGEMENT)
        registries = self.registries(site)
        # Every request takes this path: a tuple and a dict lookup. The cache
        # is keyed by the secret itself (in memory only, for tokens that
        # exist), which spares each request a SHA-256 (~1 us).
        generation = tuple(registry.generation for registry in registries)
        key = (site or self.site, secret or "")
        cached = self._principals.get(key)
        if cached is not None:
            if cached[0] == generation:
                return cached[1]
            del self._principals[key]  # stale: a revoked token's secret does not stay here
        secret_hash = hash_secret(secret) if secret else ""
        if not secret:
            principal = self._principal_of(registries, registries[0] if registries else None, ANONYMOUS_ACCESSOR, site)
        else:
            for registry in registries:
                token = registry.token_by_secret_hash(secret_hash)
                if token is not None:
                    principal = self._principal_of(registries, registry, token.accessor_id, site, token)
                    break
            else:
                raise AclNotFound("ACL not found: the token is unknown here, or was revoked; check X-Consul-Token")
        if len(self._principals) >= _PRINCIPAL_CACHE_LIMIT:
            self._principals.clear()  # bounded: a flood of made-up secrets is never cached anyway
        self._principals[key] = (generation, principal)
        return principal

    def authorizer(self, secret: str | None, site: str | None = None) -> Authorizer:
        return self.principal(secret, site).authorizer

    def _principal_of(
        self, registries: list[AclRegistry], home: AclRegistry | None, accessor: str, site: str | None,
        token: AclToken | None = None,
    ) -> Principal:
        if home is None:
            return Principal(None, GLOBAL_SCOPE, DENY_ALL)
        if token is None:
            token = home.token(accessor)
        return Principal(token, self._scope_name(home), self._build(token, home, registries, site))

    def _scope_name(self, registry: AclRegistry) -> str:
        for name, scope in self.replica.scopes.items():
            if scope.acl is registry:
                return name
        return GLOBAL_SCOPE

    def _build(self, token: AclToken | None, home: AclRegistry, registries: list[AclRegistry], site: str | None) -> Authorizer:
        if token is None:
            return DENY_ALL
        if MANAGEMENT_POLICY_ID in token.policy_ids:
            return Authorizer(management=True, principal=token.accessor_id)
        datacenter = site or self.site
        parsed = []
        for policy_id in token.policy_ids:
            policy = self.policy(policy_id, registries, home)
            if policy is None or not policy.applies_in(datacenter):
                continue  # a deleted policy grants nothing; a policy for other sites nothing here
            parsed.append(self.parsed_rules(policy))
        return Authorizer(parsed, principal=token.accessor_id)

    def policy(self, policy_id: str, registries: list[AclRegistry] | None = None, home: AclRegistry | None = None) -> AclPolicy | None:
        """A policy by ID, from the token's own scope first, then the others."""
        ordered = ([home] if home is not None else []) + [r for r in (registries or self.registries()) if r is not home]
        for registry in ordered:
            found = registry.policy(policy_id)
            if found is not None:
                return found
        return None

    def parsed_rules(self, policy: AclPolicy) -> PolicyRules:
        """A policy's parsed rules, cached per policy version (devices' rights use it too)."""
        key = (policy.policy_id, policy.stamp)
        found = self._rules.get(key)
        if found is None:
            try:
                found = parse_rules(policy.rules)
            except InvalidArgument:
                found = PolicyRules()  # checked when written; a bad record from a peer grants nothing
            if len(self._rules) >= _RULES_CACHE_LIMIT:
                self._rules.clear()
            self._rules[key] = found
        return found

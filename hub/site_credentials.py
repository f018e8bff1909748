"""Join tokens: the credential a site presents at the hub's ``/v1/sync``.

The hub issues one per site name (``konsul sites add plant-7``), shows the
secret once and keeps only its SHA-256. A session that presents it may sync
that site's scope and ``global``: read-only unless the site was added with
``--global write`` (docs/security.md). Issuing again replaces the secret
(rotation); revoking keeps the record, marked revoked, so ``konsul sites
list`` still shows the site. Either ends the site's open sessions at once
(the hub listens: ``listeners``).

Credentials live in the meta table of the hub's own store: they are the hub's
alone and never enter a replicated scope, so no edge ever holds another
site's hash.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from konsul.sync.batch import WriteBatch
from konsul.sync.errors import InvalidArgument, KonsulError
from konsul.sync.store import Store
from konsul.sync.wire import SCOPE_NAME

_META_PREFIX = "site_credential/"
GLOBAL_ACCESS = ("read", "write")
# A join token is "ksite-" and 43 URL-safe characters (32 random bytes): the
# prefix tells an operator (and a secret scanner) what leaked.
_TOKEN_PREFIX = "ksite-"


class SiteCredentialRequired(KonsulError):
    """``/v1/sync`` without a live credential for a site (answered before the WebSocket opens)."""

    code = "site_credential_required"
    status = 401


@dataclass(frozen=True)
class SiteCredential:
    site: str
    token_hash: str
    global_access: str  # "read" or "write"
    created: float  # wall-clock seconds
    revoked: float | None = None
    description: str = ""

    def to_json(self) -> dict:
        """As the API shows it: never the hash."""
        return {
            "Site": self.site,
            "Global": self.global_access,
            "CreateTime": _iso(self.created),
            "Revoked": self.revoked is not None,
            "RevokeTime": None if self.revoked is None else _iso(self.revoked),
            "Description": self.description,
        }


def hash_join_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class SiteCredentials:
    """Every site's join token, by site and by hash."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_site: dict[str, SiteCredential] = {}
        self._by_hash: dict[str, SiteCredential] = {}
        # Called with the site name when its credential is replaced or revoked.
        self.listeners: list[Callable[[str], None]] = []
        for name, raw in store.query("SELECT name, value FROM meta WHERE name >= ? AND name < ?",
                                     _META_PREFIX, _META_PREFIX[:-1] + "0"):
            try:
                record = _from_meta(name[len(_META_PREFIX):], raw)
            except (ValueError, KeyError, TypeError):
                continue  # unreadable: that site cannot join until it is added again
            self._remember(record)

    def identify(self, secret: str | None) -> SiteCredential | None:
        """The live credential ``secret`` is, if any."""
        if not secret or not secret.startswith(_TOKEN_PREFIX) or len(secret) > 128:
            return None
        found = self._by_hash.get(hash_join_token(secret))
        return found if found is not None and found.revoked is None else None

    def get(self, site: str) -> SiteCredential | None:
        return self._by_site.get(site)

    def all(self) -> list[SiteCredential]:
        return sorted(self._by_site.values(), key=lambda c: c.site)

    async def issue(self, site: str, global_access: str = "read", description: str = "") -> str:
        """A new join token for ``site`` (replacing any earlier one); the secret, shown once."""
        check_site_name(site)
        if global_access not in GLOBAL_ACCESS:
            raise InvalidArgument(f"Global is one of {list(GLOBAL_ACCESS)}, not {global_access!r}")
        if len(description) > 256:
            raise InvalidArgument("Description is at most 256 characters")
        secret = new_join_token()
        record = SiteCredential(site, hash_join_token(secret), global_access, time.time(), None, description)
        await self._store(record)
        return secret

    async def ensure(self, site: str, secret: str, global_access: str = "read", description: str = "") -> None:
        """Make ``secret`` ``site``'s join token unless it already is (a start-up setting: ``konsul dev``)."""
        check_site_name(site)
        if not secret.startswith(_TOKEN_PREFIX):
            raise InvalidArgument(f"a join token starts with {_TOKEN_PREFIX!r}")
        found = self._by_site.get(site)
        if found is not None and found.revoked is None and found.token_hash == hash_join_token(secret):
            return
        await self._store(SiteCredential(site, hash_join_token(secret), global_access, time.time(), None, description))

    async def revoke(self, site: str) -> SiteCredential | None:
        """Revoke ``site``'s join token; None if it has none."""
        found = self._by_site.get(site)
        if found is None:
            return None
        if found.revoked is None:
            found = SiteCredential(
                found.site, found.token_hash, found.global_access, found.created, time.time(), found.description
            )
            await self._store(found)
        return found

    async def _store(self, record: SiteCredential) -> None:
        batch = WriteBatch()
        batch.meta[_META_PREFIX + record.site] = json.dumps({
            "hash": record.token_hash, "global": record.global_access, "created": record.created,
            "revoked": record.revoked, "description": record.description,
        })
        await self.store.commit(batch)  # durable before the secret is shown or the old one ends
        old = self._by_site.get(record.site)
        if old is not None:
            self._by_hash.pop(old.token_hash, None)
        self._remember(record)
        for listener in list(self.listeners):
            listener(record.site)

    def _remember(self, record: SiteCredential) -> None:
        self._by_site[record.site] = record
        self._by_hash[record.token_hash] = record


def new_join_token() -> str:
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_site_name(site: str) -> str:
    if not isinstance(site, str) or not SCOPE_NAME.fullmatch(site) or site == "global":
        raise InvalidArgument(
            "a site name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "and not 'global'"
        )
    return site


def _from_meta(site: str, raw: str) -> SiteCredential:
    data = json.loads(raw)
    return SiteCredential(
        site, str(data["hash"]), data["global"] if data.get("global") in GLOBAL_ACCESS else "read",
        float(data["created"]), None if data.get("revoked") is None else float(data["revoked"]),
        str(data.get("description", "")),
    )


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

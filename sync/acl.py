"""ACL tokens and policies as replicated records (``acl_resolver.py`` checks requests against them).

Policies and tokens live in a scope's ``acl`` collection, as records like the
device registry's, so every replica that holds the scope enforces the same
rules while cut off from the others: ``global`` holds the fleet's policies and
tokens, a site's own scope its site-local tokens (Consul's ``Local: true``).

Records (CBOR payloads, keys in the collection):

- ``p/<policy id>``: ID, Name, Description, Rules (the text as given),
  Datacenters. Names are unique on every replica that sees both policies;
  two replicas that name different policies alike while partitioned both keep
  theirs, and a name then resolves to the earlier-stamped one everywhere.
- ``t/<accessor id>``: AccessorID, the SHA-256 of the SecretID (never the
  secret: a SecretID is a random UUID, 122 bits, so a slow hash adds nothing),
  Description, policy IDs (names are looked up when read, as Consul does),
  Local, creation time.
- ``bootstrap``: the marker that this state was bootstrapped.

Concurrent edits of one record resolve like any other write: the later stamp
wins and the loser stays visible as a conflict (``conflicts``).

Bootstrap happens once per replicated state: the marker is checked and written
with the management token in one change. Two partitioned replicas that both
bootstrap write two markers (one wins, the other is a visible conflict) and two
management tokens with different accessors; after they sync both tokens work.
The operator can revoke either.

The built-in ``global-management`` policy (ID ...0001, as Consul) is not
stored: every replica knows it, it cannot be changed or deleted, and a token
linking it gets the management authorizer. The anonymous token (accessor
...0002) is created at bootstrap without policies; give it policies to let
requests without a token do something.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import cbor2

from .acl_rules import parse_rules, rules_text
from .batch import WriteBatch
from .errors import InvalidArgument, KonsulError, NotFound
from .hlc import Stamp
from .records import RecordCollection
from .wire import GLOBAL_SCOPE

if TYPE_CHECKING:
    from .scope import Scope

MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
BOOTSTRAP_KEY = "bootstrap"

_POLICY_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_DESCRIPTION_CHARS = 4096
MAX_POLICY_LINKS = 256

# Every change to any ACL registry takes the next number, so a cached
# authorizer knows it is stale even across a registry rebuilt by a reload.
_generations = itertools.count(1)


class AclNotFound(KonsulError):
    """A request carried a token no replica here knows (unknown, or revoked)."""

    code = "acl_not_found"
    status = 403


class BootstrapNotAllowed(KonsulError):
    code = "acl_bootstrap_not_allowed"
    status = 403


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_scope_name(name: str) -> str:
    from .replica import check_scope_name as check

    return check(name)


def check_uuid(value: object, what: str) -> str:
    """A UUID in Consul's lower-case form, or a 400 that says so."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what} must be a UUID like 6a1253d2-1785-24fd-91c2-f8e78c745511") from None


def _check_description(description: object) -> str:
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(f"Description is a string of at most {MAX_DESCRIPTION_CHARS} characters")
    return description


def _content_hash(*fields: object) -> str:
    """Consul's ``Hash``: a digest of what the record says, base64."""
    return base64.b64encode(hashlib.sha256(cbor2.dumps(list(fields))).digest()).decode()


@dataclass(frozen=True, slots=True)
class AclPolicy:
    policy_id: str
    name: str
    description: str = ""
    rules: str = ""
    datacenters: tuple[str, ...] = ()
    stamp: Stamp | None = None

    @property
    def hash(self) -> str:
        return _content_hash(self.name, self.description, self.rules, list(self.datacenters))

    def applies_in(self, datacenter: str) -> bool:
        return not self.datacenters or datacenter in self.datacenters

    def to_payload(self) -> bytes:
        return cbor2.dumps(
            {"id": self.policy_id, "name": self.name, "description": self.description,
             "rules": self.rules, "datacenters": list(self.datacenters)}
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> AclPolicy:
        data = cbor2.loads(payload)
        policy = cls(data["id"], data["name"], data["description"], data["rules"], tuple(data["datacenters"]), stamp)
        if not all(type(s) is str for s in (policy.policy_id, policy.name, policy.description, policy.rules, *policy.datacenters)):
            raise ValueError("a policy record whose fields have the wrong types")
        return policy


MANAGEMENT_POLICY = AclPolicy(MANAGEMENT_POLICY_ID, MANAGEMENT_POLICY_NAME, "Builtin Policy that grants unlimited access")


@dataclass(frozen=True, slots=True)
class AclToken:
    accessor_id: str
    secret_hash: str
    description: str = ""
    policy_ids: tuple[str, ...] = ()
    local: bool = False
    created_ms: int = 0
    stamp: Stamp | None = None

    @property
    def hash(self) -> str:
        return _content_hash(self.description, list(self.policy_ids), self.local)

    def to_payload(self) -> bytes:
        return cbor2.dumps(
            {"accessor": self.accessor_id, "secret_hash": self.secret_hash, "description": self.description,
             "policies": list(self.policy_ids), "local": self.local, "created": self.created_ms}
        )

    @classmethod
    def from_payload(cls, payload: bytes, stamp: Stamp) -> AclToken:
        data = cbor2.loads(payload)
        token = cls(data["accessor"], data["secret_hash"], data["description"], tuple(data["policies"]),
                    data["local"], data["created"], stamp)
        strings = (token.accessor_id, token.secret_hash, token.description, *token.policy_ids)
        if not all(type(s) is str for s in strings) or type(token.local) is not bool or type(token.created_ms) is not int:
            raise ValueError("a token record whose fields have the wrong types")
        return token


class AclRegistry(RecordCollection):
    """The ACL records of one scope on one replica, with lookups by secret and by name.

    The lookups are indexes in memory, rebuilt whenever the document is
    replaced (load, compaction, a hub's epoch) and updated for every key a
    local write or a remote update touches.
    """

    collection = "acl"

    def __init__(self, versions, index, clock, quarantine=None) -> None:
        self._by_hash: dict[str, str] = {}
        self._hash_of: dict[str, str] = {}  # accessor -> secret hash
        self._by_name: dict[str, str] = {}
        self._indexes: dict[str, list[int]] = {}  # record key -> [create index, modify index]
        self.generation = 0
        self.touched: set[str] = set()  # keys written by the current local change
        super().__init__(versions, index, clock, quarantine)
        self._reindex()

    @property
    def versions(self):
        return self._versions

    @versions.setter
    def versions(self, versions) -> None:
        # Load, compaction and a hub's epoch all replace the document: rebuild the lookups.
        self._versions = versions
        if hasattr(self, "last_index"):  # not while RecordCollection.__init__ runs
            self._reindex()

    # -- indexes ---------------------------------------------------------------

    def _reindex(self) -> None:
        self._by_hash, self._hash_of = {}, {}
        now = self.last_index or self.index.value
        # A compaction or epoch keeps the records' indexes; a load numbers them anew.
        old = self._indexes
        self._indexes = {key: old.get(key) or [now, now] for key in self._versions.keys()}
        for key in list(self._versions.keys()):
            if key.startswith("t/"):
                self._index_token(key[2:])
        self._reindex_names()
        self.generation = next(_generations)

    def _index_token(self, accessor: str) -> None:
        old = self._hash_of.pop(accessor, None)
        if old is not None and self._by_hash.get(old) == accessor:
            del self._by_hash[old]
        token = self.token(accessor)
        if token is not None and token.secret_hash:
            self._hash_of[accessor] = token.secret_hash
            self._by_hash[token.secret_hash] = accessor

    def _reindex_names(self) -> None:
        names: dict[str, AclPolicy] = {}
        for policy in self.policies():
            held = names.get(policy.name)
            # Two policies named alike (made while partitioned): the earlier one keeps the name.
            if held is None or (policy.stamp, policy.policy_id) < (held.stamp, held.policy_id):
                names[policy.name] = policy
        self._by_name = {name: policy.policy_id for name, policy in names.items()}

    def _note(self, keys: Iterable[str]) -> None:
        names = False
        for key in keys:
            if self._versions.current(key) is None or self._versions.current(key).deleted:
                self._indexes.pop(key, None)
            else:
                found = self._indexes.setdefault(key, [self.last_index, self.last_index])
                found[1] = self.last_index
            if key.startswith("t/"):
                self._index_token(key[2:])
            elif key.startswith("p/"):
                names = True
        if names:
            self._reindex_names()
        self.generation = next(_generations)

    def apply_remote(self, update: bytes, batch: WriteBatch) -> set[str]:
        touched = super().apply_remote(update, batch)
        if touched:
            self._note(touched)
        return touched

    def indexes(self, key: str) -> tuple[int, int]:
        """(CreateIndex, ModifyIndex) of a record, as this replica numbers its changes."""
        found = self._indexes.get(key)
        return (found[0], found[1]) if found else (0, 0)

    # -- reading ---------------------------------------------------------------

    def _record(self, key: str, decode: Callable[[bytes, Stamp], object]):
        current = self._versions.current(key)
        if current is None or current.deleted:
            return None
        return self.quarantine.decode(
            lambda payload: decode(payload, current.stamp), current.payload, self.collection, key, current.stamp
        )

    def policy(self, policy_id: str) -> AclPolicy | None:
        if policy_id == MANAGEMENT_POLICY_ID:
            return MANAGEMENT_POLICY
        return self._record(f"p/{policy_id}", AclPolicy.from_payload)

    def policy_named(self, name: str) -> AclPolicy | None:
        if name == MANAGEMENT_POLICY_NAME:
            return MANAGEMENT_POLICY
        found = self._by_name.get(name)
        return None if found is None else self.policy(found)

    def policies(self) -> list[AclPolicy]:
        found = (self.policy(key[2:]) for key in sorted(self._versions.keys()) if key.startswith("p/"))
        return [policy for policy in found if policy is not None]

    def token(self, accessor: str) -> AclToken | None:
        return self._record(f"t/{accessor}", AclToken.from_payload)

    def tokens(self) -> list[AclToken]:
        found = (self.token(key[2:]) for key in sorted(self._versions.keys()) if key.startswith("t/"))
        return [token for token in found if token is not None]

    def token_by_secret_hash(self, secret_hash: str) -> AclToken | None:
        accessor = self._by_hash.get(secret_hash)
        if accessor is None:
            return None
        token = self.token(accessor)
        # The index is exact; the compare is belt and braces, in constant time.
        if token is None or not hmac.compare_digest(token.secret_hash, secret_hash):
            return None
        return token

    def bootstrapped(self) -> bool:
        current = self._versions.current(BOOTSTRAP_KEY)
        return current is not None and not current.deleted

    # -- writing ---------------------------------------------------------------

    def _write(self, key: str, payload: bytes | None, batch: WriteBatch) -> None:
        self._versions.write(key, self.clock.now(), payload)
        self.touched.add(key)
        self._changed(batch)
        self._note([key])

    def put_policy(self, policy: AclPolicy, batch: WriteBatch) -> AclPolicy:
        """Create or replace a policy (validated: name, rules, datacenters)."""
        policy_id = check_uuid(policy.policy_id, "ID")
        if policy_id == MANAGEMENT_POLICY_ID:
            raise InvalidArgument("the built-in global-management policy cannot be changed")
        if not isinstance(policy.name, str) or not _POLICY_NAME.fullmatch(policy.name):
            raise InvalidArgument("a policy Name is 1-128 letters, digits, '-' or '_'")
        if policy.name == MANAGEMENT_POLICY_NAME:
            raise InvalidArgument(f"the name {MANAGEMENT_POLICY_NAME!r} belongs to the built-in policy")
        holder = self._by_name.get(policy.name)
        if holder is not None and holder != policy_id:
            raise InvalidArgument(f"a policy named {policy.name!r} already exists (ID {holder}); pick another name")
        _check_description(policy.description)
        parse_rules(policy.rules)
        policy = replace(policy, rules=rules_text(policy.rules))
        for datacenter in policy.datacenters:
            if not isinstance(datacenter, str):
                raise InvalidArgument("Datacenters is a list of site names")
            check_scope_name(datacenter)
        policy = replace(policy, policy_id=policy_id)
        self._write(f"p/{policy_id}", policy.to_payload(), batch)
        return self.policy(policy_id)

    def delete_policy(self, policy_id: str, batch: WriteBatch) -> None:
        if policy_id == MANAGEMENT_POLICY_ID:
            raise InvalidArgument("the built-in global-management policy cannot be deleted")
        if self.policy(policy_id) is None:
            raise NotFound(f"no ACL policy {policy_id!r}")
        self._write(f"p/{policy_id}", None, batch)

    def create_token(
        self,
        description: str,
        policy_ids: Iterable[str],
        local: bool,
        batch: WriteBatch,
        accessor_id: str | None = None,
        secret: str | None = None,
    ) -> tuple[AclToken, str]:
        """A new token; returns it and its secret, which is never stored and cannot be read again."""
        accessor_id = check_uuid(accessor_id, "AccessorID") if accessor_id else str(uuid.uuid4())
        if accessor_id in (ANONYMOUS_ACCESSOR,) or self.token(accessor_id) is not None:
            raise InvalidArgument(f"a token with AccessorID {accessor_id} already exists")
        secret = check_uuid(secret, "SecretID") if secret else str(uuid.uuid4())
        if hash_secret(secret) in self._by_hash:
            raise InvalidArgument("a token with that SecretID already exists")
        token = AclToken(
            accessor_id, hash_secret(secret), _check_description(description), _check_links(policy_ids),
            bool(local), int(time.time() * 1000),
        )
        self._write(f"t/{accessor_id}", token.to_payload(), batch)
        return self.token(accessor_id), secret

    def update_token(self, accessor_id: str, description: str, policy_ids: Iterable[str], batch: WriteBatch) -> AclToken:
        """Replace a token's description and policies (its secret and locality stay)."""
        existing = self.token(accessor_id)
        if existing is None:
            raise NotFound(f"no ACL token with AccessorID {accessor_id!r}")
        token = replace(existing, description=_check_description(description), policy_ids=_check_links(policy_ids))
        self._write(f"t/{accessor_id}", token.to_payload(), batch)
        return self.token(accessor_id)

    def delete_token(self, accessor_id: str, batch: WriteBatch) -> None:
        if accessor_id == ANONYMOUS_ACCESSOR:
            raise InvalidArgument("the anonymous token cannot be deleted; remove its policies instead")
        if self.token(accessor_id) is None:
            raise NotFound(f"no ACL token with AccessorID {accessor_id!r}")
        self._write(f"t/{accessor_id}", None, batch)

    def bootstrap(self, batch: WriteBatch) -> tuple[AclToken, str]:
        """The first management token, once; later calls raise :class:`BootstrapNotAllowed`."""
        if self.bootstrapped():
            raise BootstrapNotAllowed(
                "ACL bootstrap no longer allowed: this state was bootstrapped already; "
                "use a management token (or ask whoever holds one) to create tokens"
            )
        self._write(BOOTSTRAP_KEY, cbor2.dumps({"at": int(time.time() * 1000)}), batch)
        if self.token(ANONYMOUS_ACCESSOR) is None:
            anonymous = AclToken(ANONYMOUS_ACCESSOR, "", "Anonymous Token", (), False, int(time.time() * 1000))
            self._write(f"t/{ANONYMOUS_ACCESSOR}", anonymous.to_payload(), batch)
        return self.create_token("Bootstrap Token (Global Management)", [MANAGEMENT_POLICY_ID], False, batch)


def _check_links(policy_ids: Iterable[str]) -> tuple[str, ...]:
    ids = tuple(dict.fromkeys(check_uuid(p, "a policy ID") for p in policy_ids))
    if len(ids) > MAX_POLICY_LINKS:
        raise InvalidArgument(f"a token links at most {MAX_POLICY_LINKS} policies")
    return ids


# -- changing a scope's ACL records ------------------------------------------------

T = TypeVar("T")


async def _change(scope: Scope, change: Callable[[AclRegistry, WriteBatch], T]) -> T:
    return await scope.change_acl(change)


async def bootstrap(scope: Scope) -> tuple[AclToken, str]:
    return await _change(scope, lambda acl, batch: acl.bootstrap(batch))


async def put_policy(scope: Scope, policy: AclPolicy) -> AclPolicy:
    return await _change(scope, lambda acl, batch: acl.put_policy(policy, batch))


async def delete_policy(scope: Scope, policy_id: str) -> None:
    await _change(scope, lambda acl, batch: acl.delete_policy(policy_id, batch))


async def create_token(
    scope: Scope, description: str = "", policy_ids: Iterable[str] = (), local: bool = False,
    accessor_id: str | None = None, secret: str | None = None,
) -> tuple[AclToken, str]:
    return await _change(
        scope, lambda acl, batch: acl.create_token(description, policy_ids, local, batch, accessor_id, secret)
    )


async def update_token(scope: Scope, accessor_id: str, description: str, policy_ids: Iterable[str]) -> AclToken:
    return await _change(scope, lambda acl, batch: acl.update_token(accessor_id, description, policy_ids, batch))


async def delete_token(scope: Scope, accessor_id: str) -> None:
    await _change(scope, lambda acl, batch: acl.delete_token(accessor_id, batch))

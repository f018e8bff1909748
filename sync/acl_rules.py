"""ACL policy rules: Consul's rule language, parsed and compiled for fast checks.

Theory of operation
-------------------
A policy's rules name *resources* (``key``, ``service``, ``device``, ...) with a
*segment* (a name or a name prefix) and a disposition: ``read``, ``list``,
``write`` or ``deny``; a few resources (``operator``, ``acl``, ``keyring``) take a
disposition alone. Rules arrive as HCL (version 1, as Consul reads them) or as
JSON, e.g.::

    key_prefix ""      { policy = "read" }
    key_prefix "app/"  { policy = "write" }
    key "app/secret"   { policy = "deny" }
    device_prefix "sensor-" { policy = "write" }
    operator = "read"

A token's policies are merged into one :class:`Authorizer`, built once per
token and policy versions. It answers ``allows(resource, name, access)``:

1. A management authorizer (the built-in ``global-management`` policy) allows
   everything.
2. An exact rule for the name decides (``key "app/x"``).
3. Else an exact *glob* rule decides (Konsul's extension, below); the one with
   the most literal characters wins.
4. Else the most specific prefix rule decides: a literal prefix counts its
   length, a glob prefix its literal characters; the highest count wins.
5. Else nothing matches and the answer is no (default deny).

Rules at the same step and specificity (from several policies, or a glob and a
literal prefix of equal weight) merge as Consul merges policies: ``deny`` wins
over everything, then ``write``, then ``list``, then ``read``. ``write`` grants
read, list and write; ``list`` grants list and read (listing keys and recursive
reads, as Consul's ``acl.enable_key_list_policy``); ``read`` grants read.

Globs
-----
Consul matches segments literally or by prefix. Konsul adds globs: in a
segment, ``*`` matches within one path segment (never a ``/``), ``**`` matches
any depth (zero or more whole segments; at the end, everything below). So
``key "sites/*/config"`` covers ``sites/a/config`` but not
``sites/a/b/config``, and ``key_prefix "fleet/**/firmware/"`` covers every
``firmware/`` folder below ``fleet/``. A ``*`` in a segment is therefore never
a literal star. To keep every check linear in the name's length (a policy must
not be able to stall an agent), a path segment holds at most one ``*`` and a
pattern at most one ``**``, which must be a whole segment.

Cost
----
An exact rule is one dict lookup. Literal prefixes are grouped by length, so
the prefix step slices the name once per distinct prefix length, longest
first, and stops at the first hit. Globs are compiled regular expressions
tried only at their specificity. Answers are memoised per (resource, name), so
a hot key costs one dict lookup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InvalidArgument, KonsulError

# Levels, ordered so that merging rules of equal weight is max(): deny wins.
READ, LIST, WRITE, DENY = 1, 2, 3, 4
LEVELS = {"read": READ, "list": LIST, "write": WRITE, "deny": DENY}
LEVEL_NAMES = {code: name for name, code in LEVELS.items()}
ACCESSES = {"read": READ, "list": LIST, "write": WRITE}

# Resources that take a segment (``key "x"``, ``key_prefix "x/"``). ``query``
# is parsed so that Consul policies load, and never asked about.
SEGMENTED = ("key", "service", "node", "agent", "session", "event", "device", "query")
# Resources that take a disposition alone (``operator = "read"``).
SCALARS = ("operator", "acl", "keyring", "mesh", "peering")
# ``list`` is meaningful only where names are listed by prefix (Consul: KV only).
_LIST_ALLOWED = {"key", "device"}
# Extra fields a segmented rule may carry besides ``policy`` (parsed, not enforced).
_EXTRA_FIELDS = {"service": {"intentions"}, "service_prefix": {"intentions"}}

MAX_RULES_BYTES = 64 * 1024
MAX_RULES = 1000
MAX_SEGMENT_CHARS = 512
_MEMO_LIMIT = 8192


class PermissionDenied(KonsulError):
    """A token lacks a permission; the detail names it (``key:write on "app/x"``)."""

    code = "permission_denied"
    status = 403


@dataclass(frozen=True, slots=True)
class Rule:
    resource: str  # "key", "service", ...
    segment: str
    prefix: bool
    level: int

    @property
    def glob(self) -> bool:
        return "*" in self.segment


@dataclass(slots=True)
class PolicyRules:
    """The parsed rules of one policy."""

    rules: list[Rule] = field(default_factory=list)
    scalars: dict[str, int] = field(default_factory=dict)


# -- parsing --------------------------------------------------------------------


def rules_text(text: str) -> str:
    """The rules a client meant: py-consul JSON-encodes the rules text it is given."""
    if isinstance(text, str) and text.lstrip().startswith('"'):
        decoded = _parse_json(text.strip())
        if isinstance(decoded, str):
            return decoded
    return text


def parse_rules(text: str) -> PolicyRules:
    """Parse a policy's rules (HCL or JSON); raises :class:`InvalidArgument` naming the problem."""
    if not isinstance(text, str):
        raise InvalidArgument("Rules is a string of HCL or JSON")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RULES_BYTES:
        raise InvalidArgument(f"rules are at most {MAX_RULES_BYTES} bytes; split them into several policies")
    stripped = text.strip()
    if not stripped:
        return PolicyRules()
    if stripped.startswith('"'):
        return parse_rules(rules_text(stripped))
    if stripped.startswith("{"):
        tree = _parse_json(stripped)
    else:
        tree = _parse_hcl(text)
    return _rules_from_tree(tree, text)


def _parse_json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidArgument(f"rules are not valid JSON: {error}") from None


def _parse_hcl(text: str) -> dict:
    parser = _hcl_parser()
    try:
        return parser.parse(text)
    except InvalidArgument:
        raise
    except (ValueError, RecursionError, TypeError, IndexError) as error:
        raise InvalidArgument(f"rules are not valid HCL: {error}") from None


_PARSER = None


def _hcl_parser():
    """A pyhcl parser that refuses a resource or segment given twice.

    pyhcl keeps the last of two equal blocks, which would let a later
    ``write`` silently replace an earlier ``deny``. Imported and built on
    first use (building one costs ~40 ms, a parse well under 1 ms), then
    reused: parses are synchronous, so one parser serves every caller.
    """
    global _PARSER
    if _PARSER is None:
        from hcl.parser import HclParser

        class _RuleParser(HclParser):
            def objectlist_flat(self, lt, replace):
                if replace:  # the top level: resources
                    seen: set = set()
                    for name, value in lt:
                        for segment in value if isinstance(value, dict) else [None]:
                            if (name, segment) in seen:
                                where = name if segment is None else f'{name} "{segment}"'
                                raise InvalidArgument(f"rules give {where} twice; keep one rule per name")
                            seen.add((name, segment))
                return super().objectlist_flat(lt, replace)

        _PARSER = _RuleParser()
    return _PARSER


def _line_of(text: str, resource: str, segment: str | None) -> str:
    """' (line N)' where ``resource "segment"`` appears in ``text``, if found."""
    needle = resource if segment is None else f'"{segment}"'
    at = text.find(needle)
    return "" if at < 0 else f" (line {text.count(chr(10), 0, at) + 1})"


def _rules_from_tree(tree, text: str) -> PolicyRules:
    if not isinstance(tree, dict):
        raise InvalidArgument("rules must be an object of resources (e.g. key_prefix \"app/\" { policy = \"read\" })")
    parsed = PolicyRules()
    for name, body in tree.items():
        if name in SCALARS:
            level = parsed.scalars[name] = _level(body, name, name, text, None)
            if level == LIST:
                raise InvalidArgument(f'{name}{_line_of(text, name, None)}: policy "list" applies to key and device rules only')
            continue
        resource, prefix = (name[:-7], True) if name.endswith("_prefix") else (name, False)
        if resource not in SEGMENTED:
            known = ", ".join([*(f"{r}, {r}_prefix" for r in SEGMENTED), *SCALARS])
            raise InvalidArgument(f"unknown ACL resource {name!r}{_line_of(text, name, None)}; known: {known}")
        for segment, rule in _segments(name, body, text):
            level = _rule_level(name, segment, rule, text)
            if level == LIST and resource not in _LIST_ALLOWED:
                raise InvalidArgument(
                    f'{name} "{segment}"{_line_of(text, name, segment)}: policy "list" applies to key and device rules only'
                )
            check_pattern(segment, f'{name} "{segment}"')
            parsed.rules.append(Rule(resource, segment, prefix, level))
            if len(parsed.rules) > MAX_RULES:
                raise InvalidArgument(f"a policy holds at most {MAX_RULES} rules; split it")
    return parsed


def _segments(name: str, body, text: str) -> Iterable[tuple[str, object]]:
    # JSON may give a resource as a list of objects (HCL's JSON form allows it).
    parts = body if isinstance(body, list) else [body]
    seen: set[str] = set()
    for part in parts:
        if not isinstance(part, dict):
            raise InvalidArgument(f'{name}{_line_of(text, name, None)} takes a name and a block, e.g. {name} "x" {{ policy = "read" }}')
        for segment, rule in part.items():
            if segment in seen:
                raise InvalidArgument(f'rules give {name} "{segment}" twice; keep one rule per name')
            seen.add(segment)
            yield segment, rule


def _rule_level(name: str, segment: str, rule, text: str) -> int:
    where = f'{name} "{segment}"'
    if not isinstance(rule, dict):
        raise InvalidArgument(f"{where}{_line_of(text, name, segment)} takes a block with policy = \"read\"|\"write\"|\"deny\"")
    extra = set(rule) - {"policy"} - _EXTRA_FIELDS.get(name, set())
    if extra:
        raise InvalidArgument(f"{where}{_line_of(text, name, segment)}: unknown field {sorted(extra)[0]!r}; a rule has policy")
    if "policy" not in rule:
        raise InvalidArgument(f"{where}{_line_of(text, name, segment)} has no policy")
    for extra_name in set(rule) - {"policy"}:
        _level(rule[extra_name], f"{where} {extra_name}", name, text, segment)
    return _level(rule["policy"], where, name, text, segment)


def _level(value, where: str, name: str, text: str, segment: str | None) -> int:
    if not isinstance(value, str) or value not in LEVELS:
        raise InvalidArgument(
            f"{where}{_line_of(text, name, segment)}: policy {value!r} is not one of read, write, list, deny"
        )
    return LEVELS[value]


def check_pattern(segment: str, where: str) -> str:
    """Refuse segments a check could not match in linear time (see the module doc)."""
    if not isinstance(segment, str):
        raise InvalidArgument(f"{where}: a segment is a string")
    if len(segment) > MAX_SEGMENT_CHARS:
        raise InvalidArgument(f"{where}: a segment is at most {MAX_SEGMENT_CHARS} characters")
    if "*" not in segment:
        return segment
    doubles = 0
    for part in segment.split("/"):
        if part == "**":
            doubles += 1
        elif "**" in part:
            raise InvalidArgument(f"{where}: '**' stands for whole path segments (write a/**/b)")
        elif part.count("*") > 1:
            raise InvalidArgument(f"{where}: a path segment holds at most one '*'")
    if doubles > 1:
        raise InvalidArgument(f"{where}: a pattern holds at most one '**'")
    return segment


def glob_regex(segment: str) -> re.Pattern[str]:
    """The regular expression of a glob segment (matched from the name's start)."""
    parts = segment.split("/")
    out: list[str] = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part == "**":
            # Zero or more whole segments; at the end, anything below.
            out.append(".*" if i == last else "(?:[^/]*/)*")
            continue
        out.append("[^/]*".join(re.escape(piece) for piece in part.split("*")))
        if i != last:
            out.append("/")
    return re.compile("".join(out), re.DOTALL)


def literal_weight(segment: str) -> int:
    """A glob's specificity: how many characters it matches literally."""
    return len(segment) - segment.count("*")


def shorthand_rules(kv_read: Iterable[str] = (), kv_write: Iterable[str] = (), devices: Iterable[str] = ()) -> PolicyRules:
    """Rules for a device record's ``KVRead``/``KVWrite`` prefixes (and its own id).

    ``KVRead: ["cfg/"]`` is ``key_prefix "cfg/" { policy = "read" }``,
    ``KVWrite`` the same with ``write``; each name in ``devices`` gets
    ``device "<id>" { policy = "write" }`` (a device reports its own twin and
    telemetry). Merged like any rules: a write beats a read of the same prefix.
    """
    rules = [Rule("key", prefix, True, READ) for prefix in kv_read]
    rules += [Rule("key", prefix, True, WRITE) for prefix in kv_write]
    rules += [Rule("device", name, False, WRITE) for name in devices]
    return PolicyRules(rules)


# -- authorizing -------------------------------------------------------------------


class _Table:
    """The compiled rules of one resource."""

    __slots__ = ("exact", "exact_globs", "prefix_steps", "rules", "memo")

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.exact: dict[str, int] = {}
        # Globs as (literal head, regex, level): the head (text before the
        # first '*') rules most names out before the regex runs.
        globs: dict[int, list[tuple[str, re.Pattern[str], int]]] = {}
        literal: dict[int, dict[str, int]] = {}
        prefix_globs: dict[int, list[tuple[str, re.Pattern[str], int]]] = {}
        for rule in rules:
            if rule.glob:
                target = prefix_globs if rule.prefix else globs
                head = rule.segment.split("*", 1)[0]
                target.setdefault(literal_weight(rule.segment), []).append((head, glob_regex(rule.segment), rule.level))
            elif rule.prefix:
                group = literal.setdefault(len(rule.segment), {})
                group[rule.segment] = max(group.get(rule.segment, 0), rule.level)
            else:
                self.exact[rule.segment] = max(self.exact.get(rule.segment, 0), rule.level)
        self.exact_globs = sorted(globs.items(), reverse=True)
        weights = sorted(set(literal) | set(prefix_globs), reverse=True)
        self.prefix_steps = [(w, literal.get(w), prefix_globs.get(w, ())) for w in weights]
        self.memo: dict[str, int] = {}

    def level(self, name: str) -> int:
        """The deciding level for ``name``; 0 when no rule matches."""
        found = self.memo.get(name)
        if found is not None:
            return found
        found = self.exact.get(name, 0)
        if not found:
            for _weight, matchers in self.exact_globs:
                for head, regex, level in matchers:
                    if level > found and name.startswith(head) and regex.fullmatch(name):
                        found = level
                if found:
                    break
        if not found:
            size = len(name)
            for weight, literals, matchers in self.prefix_steps:
                if literals is not None and weight <= size:
                    found = literals.get(name[:weight], 0)
                for head, regex, level in matchers:
                    if level > found and name.startswith(head) and regex.match(name):
                        found = level
                if found:
                    break
        if len(self.memo) >= _MEMO_LIMIT:
            self.memo.clear()  # a bounded memo: many distinct names only cost the lookups above
        self.memo[name] = found
        return found


def _grants(level: int, access: int) -> bool:
    return level != DENY and level >= access


class Authorizer:
    """What one token may do: its policies' rules merged and compiled.

    Args:
        policies: the parsed rules of every policy that applies.
        management: the token holds the built-in management policy.
        principal: how refusals name the token (its accessor id).
    """

    def __init__(self, policies: Iterable[PolicyRules] = (), *, management: bool = False, principal: str = "anonymous") -> None:
        self.management = management
        self.principal = principal
        by_resource: dict[str, list[Rule]] = {}
        self.scalars: dict[str, int] = {}
        for policy in policies:
            for rule in policy.rules:
                by_resource.setdefault(rule.resource, []).append(rule)
            for name, level in policy.scalars.items():
                self.scalars[name] = max(self.scalars.get(name, 0), level)
        self._tables = {resource: _Table(rules) for resource, rules in by_resource.items()}

    def allows(self, resource: str, name: str, access: str) -> bool:
        """Whether ``access`` ("read", "list", "write") on ``resource`` ``name`` is allowed.

        For a scalar resource (``operator``, ``acl``, ``keyring``) ``name`` is ignored.
        """
        if self.management:
            return True
        wanted = ACCESSES[access]
        table = self._tables.get(resource)
        if table is not None:
            return _grants(table.level(name), wanted)
        return _grants(self.scalars.get(resource, 0), wanted)

    def allows_subtree(self, resource: str, prefix: str, access: str) -> bool:
        """Whether ``access`` is allowed on every name starting with ``prefix``.

        For recursive deletes (Consul's KeyWritePrefix): the rule deciding for
        the prefix itself must allow it, and so must every rule that could
        decide for some name below it. Globs count if they could match below
        the prefix at all, so the answer errs towards no.
        """
        if self.management:
            return True
        wanted = ACCESSES[access]
        table = self._tables.get(resource)
        if table is None:
            return False
        if not _grants(table.level(prefix), wanted):
            return False
        for rule in table.rules:
            head = rule.segment.split("*", 1)[0] if rule.glob else rule.segment
            below = head.startswith(prefix) or (rule.glob and prefix.startswith(head))
            if below and not _grants(rule.level, wanted):
                return False
        return True

    def filter(self, resource: str, names: Iterable[str], access: str = "read") -> list[str]:
        """The names the token may see (list filtering, as Consul answers list reads)."""
        if self.management:
            return list(names)
        wanted = ACCESSES[access]
        table = self._tables.get(resource)
        if table is None:
            return []
        level = table.level
        return [name for name in names if _grants(level(name), wanted)]

    def require(self, resource: str, name: str, access: str) -> None:
        """Raise :class:`PermissionDenied` naming the missing permission unless allowed."""
        if not self.allows(resource, name, access):
            raise PermissionDenied(self.denial(resource, name, access))

    def require_subtree(self, resource: str, prefix: str, access: str) -> None:
        if not self.allows_subtree(resource, prefix, access):
            raise PermissionDenied(self.denial(resource, prefix, access, subtree=True))

    def denial(self, resource: str, name: str, access: str, subtree: bool = False) -> str:
        target = "" if resource in SCALARS else f' on {"every name under " if subtree else ""}{name!r}'
        return (
            f"token {self.principal} lacks permission '{resource}:{access}'{target}; "
            "use a token whose policies grant it"
        )


MANAGEMENT = Authorizer(management=True, principal="management")
DENY_ALL = Authorizer(principal="anonymous")

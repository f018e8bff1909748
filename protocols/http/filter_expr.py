"""Consul's ``?filter=`` expression language (go-bexpr), parsed and evaluated.

Theory of operation. An expression is tokenized, then parsed by recursive
descent into a small tree of :class:`Match`, :class:`Not` and :class:`BoolOp`
nodes. Every selector is resolved against the endpoint's :data:`Schema` while
parsing, so an unknown field or a value of the wrong type (``Port == abc``) is
a 400 before anything is read, as in Consul. Evaluation walks the JSON answer
the endpoint is about to send: the filter sees exactly the field names a
client sees.

Grammar (go-bexpr's)::

    expr     := and_expr ("or" and_expr)*
    and_expr := not_expr ("and" not_expr)*
    not_expr := "not" not_expr | "(" expr ")" | match
    match    := selector ("==" | "!=") value
              | selector "is" ["not"] "empty"
              | value ["not"] "in" selector
              | selector ["not"] ("contains" | "matches") value
    selector := name ("." name | "[" string "]")*
    value    := "double-quoted" | `raw` | unquoted-word

Bounds: an expression is at most :data:`MAX_LENGTH` characters and
:data:`MAX_DEPTH` levels of nesting, and regular expressions are RE2 (the
syntax Go's ``regexp`` takes, and linear time: no pattern can make a match
run away). No input raises anything but :class:`FilterError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from konsul.sync.errors import InvalidArgument

MAX_LENGTH = 4096
MAX_DEPTH = 32
MAX_PATTERN = 512


class FilterError(InvalidArgument):
    code = "invalid_filter"


# -- schemas: the selectors an endpoint offers, and their types ------------------

STR, INT, BOOL = "string", "integer", "boolean"
STR_LIST = "list of strings"
STR_MAP = "map of strings"


@dataclass(frozen=True)
class MapOf:
    """A map whose keys are the user's (``Meta.<key>``), each holding ``value``."""

    value: Any


@dataclass(frozen=True)
class ListOf:
    """A list of objects: a selector through it yields each element's field."""

    item: Any


Schema = dict[str, Any]  # field name -> STR | INT | ... | nested Schema | MapOf | ListOf


# -- tokens ----------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<op>==|!=|\(|\)|\[|\])
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<word>[A-Za-z0-9_\-./:@+*]+)
    """,
    re.VERBOSE | re.DOTALL,
)
_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "matches", "is", "empty"})
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "/": "/"}


@dataclass(frozen=True)
class Token:
    kind: str  # "op", "str" (quoted), "word", "end"
    text: str
    at: int


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_LENGTH:
        raise FilterError(f"the filter is {len(text)} characters long; at most {MAX_LENGTH} are accepted")
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise FilterError(f"filter: unexpected {text[pos]!r} at character {pos + 1}")
        kind = match.lastgroup
        if kind == "dq":
            tokens.append(Token("str", _unescape(match.group()[1:-1], pos), pos))
        elif kind == "raw":
            tokens.append(Token("str", match.group()[1:-1], pos))
        elif kind != "space":
            tokens.append(Token(kind or "", match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _unescape(body: str, at: int) -> str:
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]  # the token pattern guarantees a character follows
            if nxt not in _ESCAPES:
                raise FilterError(f"filter: unknown escape \\{nxt} in the string at character {at + 1}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# -- the tree --------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    path: tuple[str, ...]
    op: str  # ==, !=, empty, not-empty, in, not-in, matches, not-matches
    value: Any
    field_type: Any
    through_list: bool  # the selector passes through a list of objects: any element may match


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    parts: tuple[Node, ...]


Node = Union[Match, Not, BoolOp]


class _Parser:
    def __init__(self, tokens: list[Token], schema: Schema) -> None:
        self.tokens = tokens
        self.pos = 0
        self.schema = schema
        self.depth = 0

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def take(self) -> Token:
        token = self.peek()
        self.pos += 1
        return token

    def is_keyword(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "word" and token.text == word

    def expect_keyword(self, word: str) -> None:
        if not self.is_keyword(word):
            raise self.error(f"expected {word!r}")
        self.take()

    def error(self, what: str) -> FilterError:
        token = self.peek()
        found = "the end of the filter" if token.kind == "end" else repr(token.text[:40])
        return FilterError(f"filter: {what}, found {found} at character {token.at + 1}")

    def parse(self) -> Node:
        node = self.expr()
        if self.peek().kind != "end":
            raise self.error("expected 'and', 'or' or the end of the filter")
        return node

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter: nested more than {MAX_DEPTH} levels deep")

    def expr(self) -> Node:
        parts = [self.and_expr()]
        while self.is_keyword("or"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else BoolOp("or", tuple(parts))

    def and_expr(self) -> Node:
        parts = [self.not_expr()]
        while self.is_keyword("and"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def not_expr(self) -> Node:
        self.nested()
        try:
            if self.is_keyword("not"):
                self.take()
                return Not(self.not_expr())
            if self.peek().kind == "op" and self.peek().text == "(":
                self.take()
                inner = self.expr()
                if not (self.peek().kind == "op" and self.peek().text == ")"):
                    raise self.error("expected ')'")
                self.take()
                return inner
            return self.match()
        finally:
            self.depth -= 1

    def match(self) -> Node:
        # "value in selector" starts with a value; everything else with a selector.
        if self.is_keyword("in", 1) or (self.is_keyword("not", 1) and self.is_keyword("in", 2)):
            value = self.value()
            negated = self.is_keyword("not")
            if negated:
                self.take()
            self.expect_keyword("in")
            path, field_type, through = self.selector()
            return self.checked(path, "not-in" if negated else "in", value, field_type, through)
        path, field_type, through = self.selector()
        token = self.peek()
        if token.kind == "op" and token.text in ("==", "!="):
            self.take()
            return self.checked(path, token.text, self.value(), field_type, through)
        if self.is_keyword("is"):
            self.take()
            negated = self.is_keyword("not")
            if negated:
                self.take()
            self.expect_keyword("empty")
            return self.checked(path, "not-empty" if negated else "empty", None, field_type, through)
        negated = self.is_keyword("not")
        if negated:
            self.take()
        for verb in ("contains", "matches"):
            if self.is_keyword(verb):
                self.take()
                op = {"contains": "in", "matches": "matches"}[verb]
                return self.checked(path, ("not-" if negated else "") + op, self.value(), field_type, through)
        raise self.error("expected ==, !=, is empty, is not empty, contains, not contains, matches or not matches")

    def value(self) -> str:
        token = self.peek()
        if token.kind == "str" or (token.kind == "word" and token.text not in _KEYWORDS):
            self.take()
            return token.text
        raise self.error("expected a value (quote it if it is a keyword)")

    def selector(self) -> tuple[tuple[str, ...], Any, bool]:
        token = self.peek()
        if token.kind != "word" or token.text in _KEYWORDS or not token.text[:1].isalpha():
            raise self.error("expected a selector such as Service.Tags")
        self.take()
        path = token.text.split(".")
        if "" in path:
            raise FilterError(f"filter: the selector {token.text!r} has an empty part")
        while self.peek().kind == "op" and self.peek().text == "[":
            self.take()
            key = self.take()
            if key.kind != "str" or not (self.peek().kind == "op" and self.peek().text == "]"):
                raise self.error('expected ["key"] in the selector')
            self.take()
            path.append(key.text)
        return (tuple(path), *resolve(self.schema, tuple(path)))

    def checked(self, path: tuple[str, ...], op: str, value: Any, field_type: Any, through: bool) -> Match:
        name = ".".join(path)
        if op in ("==", "!="):
            if field_type not in (STR, INT, BOOL):
                raise FilterError(f"filter: {name} is a {describe(field_type)}; compare it with contains or is empty")
            value = coerce(value, field_type, name)
        elif op in ("in", "not-in"):
            if field_type not in (STR, STR_LIST, STR_MAP) and not isinstance(field_type, MapOf):
                raise FilterError(f"filter: {name} is a {describe(field_type)}; 'in' and 'contains' need a string, list or map")
        elif op in ("matches", "not-matches"):
            if field_type not in (STR, STR_LIST):
                raise FilterError(f"filter: {name} is a {describe(field_type)}; 'matches' needs a string")
            value = compile_pattern(value)
        elif field_type in (INT, BOOL):
            raise FilterError(f"filter: {name} is a {describe(field_type)}, which is never empty")
        return Match(path, op, value, field_type, through)


def describe(field_type: Any) -> str:
    if isinstance(field_type, str):
        return field_type
    if isinstance(field_type, MapOf):
        return "map"
    if isinstance(field_type, ListOf):
        return "list of objects"
    return "object"


def resolve(schema: Schema, path: tuple[str, ...]) -> tuple[Any, bool]:
    """The type a selector names, and whether it passes through a list of objects."""
    current: Any = schema
    through = False
    for depth, part in enumerate(path):
        if isinstance(current, ListOf):
            current, through = current.item, True
        if isinstance(current, MapOf):
            current = current.value
        elif current == STR_MAP:
            current = STR
        elif isinstance(current, dict) and part in current:
            current = current[part]
        else:
            known = sorted(current) if isinstance(current, dict) else []
            where = ".".join(path[:depth]) or "this endpoint"
            hint = f"; {where} has {', '.join(known)}" if known else f"; {where} has no fields"
            raise FilterError(f"filter: unknown selector {'.'.join(path)!r}{hint}")
    return current, through


def coerce(raw: str, field_type: Any, name: str) -> Any:
    if field_type == INT:
        if not re.fullmatch(r"-?[0-9]{1,19}", raw):
            raise FilterError(f"filter: {name} is an integer; {raw[:40]!r} is not one")
        return int(raw)
    if field_type == BOOL:
        if raw.lower() not in ("true", "false"):
            raise FilterError(f"filter: {name} is true or false, not {raw[:40]!r}")
        return raw.lower() == "true"
    return raw


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    if len(pattern) > MAX_PATTERN:
        raise FilterError(f"filter: a pattern is at most {MAX_PATTERN} characters")
    import re2  # RE2, as Go's regexp: linear time whatever the pattern

    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except Exception as error:  # re2 raises its own error type, and ValueError on bad UTF-8
        raise FilterError(f"filter: {pattern[:60]!r} is not a regular expression: {error}") from None
    return lambda text: compiled.search(text) is not None


# -- evaluation ------------------------------------------------------------------

_MISSING = object()


def _values(document: Any, path: tuple[str, ...]) -> list[Any]:
    """The values a selector reaches in a JSON document (several through a list)."""
    current = [document]
    for part in path:
        following = []
        for value in current:
            if isinstance(value, list):
                following.extend(v.get(part, _MISSING) if isinstance(v, dict) else _MISSING for v in value)
            elif isinstance(value, dict):
                following.append(value.get(part, _MISSING))
            else:
                following.append(_MISSING)
        current = following
    return current


def _empty_of(field_type: Any) -> Any:
    if field_type == STR:
        return ""
    if field_type in (STR_LIST,) or isinstance(field_type, ListOf):
        return []
    if field_type == INT:
        return 0
    if field_type == BOOL:
        return False
    return {}


def _test(match: Match, value: Any) -> bool:
    if value is _MISSING or value is None:
        value = _empty_of(match.field_type)  # a missing map key reads as empty, as in go-bexpr
    op = match.op
    if op == "==":
        return value == match.value and type(value) is type(match.value)
    if op == "!=":
        return not (value == match.value and type(value) is type(match.value))
    if op in ("empty", "not-empty"):
        empty = len(value) == 0 if isinstance(value, (str, list, dict)) else False
        return empty if op == "empty" else not empty
    if op in ("in", "not-in"):
        found = match.value in value if isinstance(value, (str, list, dict)) else False
        return found if op == "in" else not found
    # matches / not-matches
    texts = value if isinstance(value, list) else [value]
    found = any(isinstance(t, str) and match.value(t) for t in texts)
    return found if op == "matches" else not found


def _eval(node: Node, document: Any) -> bool:
    if isinstance(node, Match):
        values = _values(document, node.path)
        if node.through_list:
            # Any element matching matches; the negated forms hold for every element.
            if node.op in ("!=", "not-in", "not-matches", "not-empty"):
                return all(_test(node, v) for v in values)
            return any(_test(node, v) for v in values)
        return _test(node, values[0])
    if isinstance(node, Not):
        return not _eval(node.inner, document)
    if node.op == "and":
        return all(_eval(part, document) for part in node.parts)
    return any(_eval(part, document) for part in node.parts)


@dataclass(frozen=True)
class Filter:
    """A parsed expression; call it on a JSON document to learn whether it matches."""

    source: str
    tree: Node

    def __call__(self, document: Any) -> bool:
        return _eval(self.tree, document)


def parse(text: str, schema: Schema) -> Filter:
    """Parse ``text`` against ``schema``; raises :class:`FilterError` (a 400) on any fault."""
    if not text.strip():
        raise FilterError("filter: the expression is empty")
    return Filter(text, _Parser(tokenize(text), schema).parse())

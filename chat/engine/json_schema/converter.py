"""JSON Schema -> GBNF, compact JSON (no whitespace), every accepted keyword enforced by the grammar.

Where a schema allows many shapes the grammar may allow fewer (a subset: only declared properties, at
most one item under `uniqueItems`, whole-number bounds tightened inwards), never more, so a reply that
the grammar lets through validates. A keyword that cannot be enforced, or a schema no value satisfies,
raises SchemaNotConvertible naming the keyword. See docs/API.md, "Structured outputs".
"""

from __future__ import annotations

import json
import math
import re
import contextlib
import contextvars
import time
import warnings
from urllib.parse import unquote

import regex

from .errors import SchemaNotConvertible
from .exclusive import exclusive_branches
from .formats import FORMATS
from .patterns import pattern_grammar
from .ranges import bounded_number, integer_range

MAX_RULES = 4000
MAX_GRAMMAR_CHARS = 1_000_000
MAX_VISITS = 20_000  # bounds the work one request's schema can cause
MAX_DEPTH = 48
MAX_BRANCHES = 64
# Every listed value is an open alternative of the grammar until the reply tells them apart, and the sampler's
# work per filtered token grows with them (60,000 values: seconds on the thread every stream shares).
MAX_ENUM_VALUES = 1000
UNBOUNDED_BEYOND = 10 ** 16  # unbounded numbers are written with at most 16 integer digits
MAX_REPEAT = 2000  # a larger maxLength / maxItems is lowered to it (fewer is still valid); a larger minimum refused
# The schema's own regular expressions run against its own values (enum, const, property names) in a budget:
# Python's `re` backtracks exponentially on patterns like ^(a+)+$ and holds the GIL (the whole process) meanwhile.
REGEX_SECONDS = 0.25

ASSERTIONS = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "additionalItems", "minItems",
    "maxItems", "uniqueItems", "contains", "minContains", "maxContains", "minLength", "maxLength", "pattern",
    "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "allOf", "anyOf", "oneOf",
    "not", "if", "then", "else", "$ref", "dependencies", "dependentRequired", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", FORBIDDEN := "x-llmsite-forbidden",
})  # every other keyword is an annotation (title, description, default, examples, vendor "x-" keys...)
REFUSED = {
    "contains": "'contains'",
    "unevaluatedItems": "'unevaluatedItems'",
    "$dynamicRef": "'$dynamicRef'",
    "$recursiveRef": "'$recursiveRef'",
}
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
HINTS = {
    "object": ("properties", "required", "additionalProperties", "minProperties", "maxProperties", "patternProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}
CHAR = r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))'
BASE_RULES = {
    "char": CHAR,
    "string": r'"\"" char* "\""',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "number": r'"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,15})?',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": r'object | array | string | number | boolean | null',
    "object": r'"{" (string ":" value ("," string ":" value)*)? "}"',
    "array": r'"[" (value ("," value)*)? "]"',
}


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _no_literals(body: str) -> str:
    """`body` with its string literals and character classes blanked out (what is left names rules)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', " ", body)


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _pointer(path: str, key) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if _is_int(value) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


_shared_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("regex_deadline", default=None)


@contextlib.contextmanager
def one_regex_budget():
    """Every schema converted inside shares one REGEX_SECONDS budget (one request's tools: 128 of them, each with a
    budget of its own, spent half a minute of CPU)."""
    token = _shared_deadline.set(_shared_deadline.get() or time.monotonic() + REGEX_SECONDS)
    try:
        yield
    finally:
        _shared_deadline.reset(token)


class Converter:
    def __init__(self, schema):
        self.root_schema = schema
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.last_number: dict[str, int] = {}  # rule name base -> the number its latest name took (_fresh)
        self.ref_rules: dict[str, str] = {}
        self.memo: dict[str, str] = {}
        self.unsatisfiable: dict[str, SchemaNotConvertible] = {}
        self.visits = 0
        self.used_base: set[str] = set()
        shared = _shared_deadline.get()
        self.regex_deadline = shared if shared is not None else time.monotonic() + REGEX_SECONDS

    def search(self, pattern: str, text: str, keyword: str, path: str):
        """regex.search within what is left of the schema's regex budget (SchemaNotConvertible past it); re.error
        and TypeError for a pattern that is not a regular expression, as re.search raises them."""
        try:
            left = self.regex_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return regex.search(pattern, text, timeout=left)
        except TimeoutError:
            raise SchemaNotConvertible("Its regular expressions take too long to check against its values",
                                       keyword=keyword, path=path) from None
        except regex.error as exc:
            raise re.error(str(exc)) from None

    # -- rules ------------------------------------------------------------------------------

    def add(self, hint: str, body: str) -> str:
        if body in self.by_body:
            return self.by_body[body]
        if len(self.rules) >= MAX_RULES:
            raise SchemaNotConvertible("The schema is too large", keyword="$defs", path="/")
        name = self._fresh(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def _fresh(self, hint: str) -> str:
        base = "s-" + (re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-")[-40:] or "x")
        # Counting on from the base's last number: counting from 1 each time made 4,000 properties ending alike
        # cost 8 million lookups (2 s of a request thread).
        n = self.last_number.get(base, 1)
        name = base if n == 1 else f"{base}-{n}"
        while name in self.rules or name in BASE_RULES:
            n += 1
            name = f"{base}-{n}"
        self.last_number[base] = n
        return name

    def base(self, name: str) -> str:
        self.used_base.add(name)
        return name

    def grammar(self, root: str = "root") -> str:
        top = self.visit(self.root_schema, "", 0)
        bodies = {**BASE_RULES, **self.rules}
        reachable, todo = set(), [top]
        while todo:  # rules left by a branch that was dropped are not written
            name = todo.pop()
            if name in reachable:
                continue
            reachable.add(name)
            todo += [n for n in re.findall(r"(?<![\w\"\\-])[a-z][a-zA-Z0-9-]*(?![\w\"-])", _no_literals(bodies[name]))
                     if n in bodies]
        lines = [f"{root} ::= {top}"]
        lines += [f"{name} ::= {body}" for name, body in bodies.items() if name in reachable]
        text = "\n".join(lines) + "\n"
        if len(text) > MAX_GRAMMAR_CHARS:
            raise SchemaNotConvertible("The schema is too large", keyword="$defs", path="/")
        return text

    # -- schemas ----------------------------------------------------------------------------

    def visit(self, schema, path: str, depth: int) -> str:
        """The name of a rule matching exactly the compact JSON texts this converter allows for `schema`."""
        if depth > MAX_DEPTH:
            raise SchemaNotConvertible("The schema nests or recurses too deeply", keyword="$ref", path=path)
        if schema is True or schema == {}:
            return self.base("value")
        if schema is False:
            raise SchemaNotConvertible("The schema 'false' admits no value", keyword="false", path=path,
                                       unsatisfiable=True)
        if not isinstance(schema, dict):
            raise SchemaNotConvertible("A schema must be an object or a boolean", keyword="type", path=path)
        key = json.dumps(schema, sort_keys=True, default=str)
        if key in self.memo:  # also what makes recursive schemas finite
            return self.memo[key]
        if key in self.unsatisfiable:
            raise self.unsatisfiable[key]
        self.visits += 1
        if len(self.rules) >= MAX_RULES or self.visits > MAX_VISITS:
            raise SchemaNotConvertible("The schema is too large", keyword="$defs", path=path)
        mark = self._mark()
        name = self._fresh(path)
        self.rules[name] = ""  # reserved while its body is built
        self.memo[key] = name
        try:
            self.rules[name] = self._body(schema, path, depth)
        except SchemaNotConvertible as exc:
            self._rollback(mark)  # rules made meanwhile may refer to this one
            if exc.code == "unsatisfiable_schema":
                self.unsatisfiable[key] = exc
            raise
        except BaseException:
            self._rollback(mark)
            raise
        return name

    def _mark(self) -> tuple[int, ...]:
        return len(self.rules), len(self.by_body), len(self.memo), len(self.ref_rules)

    def _rollback(self, mark: tuple[int, ...]) -> None:
        for table, size in zip((self.rules, self.by_body, self.memo, self.ref_rules), mark):
            for key in list(table)[size:]:
                del table[key]

    def _body(self, schema: dict, path: str, depth: int) -> str:
        if any(k in schema for k in ("if", "then", "else")):
            return self.visit(self._unfold_conditional(schema, path), path, depth + 1)
        for keyword, what in REFUSED.items():
            if keyword in schema:
                raise SchemaNotConvertible(f"The server does not support {what}", keyword=keyword,
                                           path=_pointer(path, keyword))
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref" and k in ASSERTIONS}
            if not rest:
                return self.ref_rule(schema["$ref"], path, depth)
            return self.visit(self.merge(self.resolve(schema["$ref"], path), rest, path, depth), path, depth + 1)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            parts = schema["allOf"]
            if not isinstance(parts, list) or not parts:
                raise SchemaNotConvertible("'allOf' must be a non-empty list", keyword="allOf", path=path)
            for index, part in enumerate(parts):
                merged = self.merge(merged, part, _pointer(_pointer(path, "allOf"), index), depth)
            return self.visit(merged, path, depth + 1)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self.alternatives(schema, keyword, path, depth)
        if "not" in schema:
            return self.visit(self.without_not(schema, path), path, depth + 1)
        for keyword in ("dependencies", "dependentRequired", "dependentSchemas"):
            if keyword in schema:
                return self.visit(self.without_dependencies(schema, keyword, path, depth), path, depth + 1)
        if "const" in schema:
            return self.values([schema["const"]], schema, "const", path)
        if "enum" in schema:
            if not isinstance(schema["enum"], list):
                raise SchemaNotConvertible("'enum' must be a list", keyword="enum", path=path)
            return self.values(schema["enum"], schema, "enum", path)
        return " | ".join(self.typed(t, schema, path, depth) for t in self.types(schema, path))

    def _unfold_conditional(self, schema: dict, path: str) -> dict:
        """if/then/else as anyOf [if and then, not-if and else]; a branch the server cannot write is left out."""
        rest = {k: v for k, v in schema.items() if k not in ("if", "then", "else")}
        if "if" not in schema:
            return rest  # then/else without if assert nothing
        condition = schema["if"]
        branches = [{"allOf": [condition, schema.get("then", True)]},
                    {"allOf": [{"not": condition}, schema.get("else", True)]}]
        if "anyOf" in rest:
            if len(rest["anyOf"]) * 2 > MAX_BRANCHES:
                raise SchemaNotConvertible("Too many combinations of 'anyOf' and 'if'", keyword="if", path=path)
            branches = [{"allOf": [x, y]} for x in rest["anyOf"] for y in branches]
        return {**rest, "anyOf": branches}

    def without_not(self, schema: dict, path: str) -> dict:
        """`schema` without `not`, narrowed so that no value it admits matches the negated schema (a subset)."""
        negated = self._plain(schema["not"], _pointer(path, "not"), 0)
        rest = {k: v for k, v in schema.items() if k != "not"}
        assertive = {k for k in negated if k in ASSERTIONS}
        where = _pointer(path, "not")
        if not assertive:  # not {} admits nothing
            raise SchemaNotConvertible("'not' of a schema that admits everything admits nothing", keyword="not",
                                       path=where, unsatisfiable=True)
        if assertive == {"type"}:
            banned = set(negated["type"] if isinstance(negated["type"], list) else [negated["type"]])
            if "number" in banned:
                banned.add("integer")
            kept = [t for t in self.types(rest, path) if t not in banned]
            if not kept:
                raise SchemaNotConvertible("'not' forbids every type the schema allows", keyword="not", path=where,
                                           unsatisfiable=True)
            return {**rest, "type": kept}
        names = self._required_sets(negated)
        if names is not None and "object" in self.types(rest, path):
            # the value is an object that lacks one property of each set the negated schema requires
            return {**rest, "type": "object", FORBIDDEN: [*rest.get(FORBIDDEN, []), *names]}
        if assertive <= {"enum", "const", "type"} and assertive - {"type"}:
            banned = negated.get("enum", []) + ([negated["const"]] if "const" in negated else [])
            if "enum" in rest or "const" in rest:
                values = rest["enum"] if "enum" in rest else [rest["const"]]
                kept = [v for v in values if all(compact(v) != compact(b) for b in banned)]
                rest.pop("const", None)
                return {**rest, "enum": kept}
            kinds = {_type_of(b) for b in banned}
            if "integer" in kinds:
                kinds.add("number")
            if not kinds & set(self.types(rest, path)):  # the banned values are of other types anyway
                return rest
        raise SchemaNotConvertible("The server supports 'not' only for a type, a required property or enum values",
                                   keyword="not", path=where)

    def _required_sets(self, negated: dict) -> list[str] | None:
        """Names to forbid so that `negated` fails through its `required`: one per allOf part, all of an anyOf."""
        if isinstance(negated.get("required"), list) and negated["required"]:
            return [negated["required"][0]]
        keys = {k for k in negated if k in ASSERTIONS}
        if keys == {"allOf"} and isinstance(negated["allOf"], list):
            for part in negated["allOf"]:
                if isinstance(part, dict) and isinstance(part.get("required"), list) and part["required"]:
                    return [part["required"][0]]
        if keys == {"anyOf"} and isinstance(negated["anyOf"], list) and negated["anyOf"]:
            names = []
            for part in negated["anyOf"]:
                found = self._required_sets(part) if isinstance(part, dict) else None
                if found is None:
                    return None
                names += found
            return names
        return None

    def without_dependencies(self, schema: dict, keyword: str, path: str, depth: int) -> dict:
        """Dependencies made to hold: a property whose dependencies are not required anyway is never written."""
        rest = {k: v for k, v in schema.items() if k != keyword}
        dependencies = schema[keyword]
        if not isinstance(dependencies, dict):
            raise SchemaNotConvertible(f"'{keyword}' must be an object", keyword=keyword, path=path)
        required = list(rest.get("required", []))
        for name, dependency in dependencies.items():
            if name not in required:
                rest[FORBIDDEN] = [*rest.get(FORBIDDEN, []), name]
            elif isinstance(dependency, list):
                required += [d for d in dependency if d not in required]
                rest["required"] = required
            else:
                rest = self.merge(rest, dependency, _pointer(_pointer(path, keyword), name), depth)
                required = list(rest.get("required", []))
        return rest

    def types(self, schema: dict, path: str) -> list[str]:
        declared = schema.get("type")
        if declared is None:
            hinted = [t for t, keys in HINTS.items() if any(k in schema for k in keys)]
            return hinted or list(TYPES)
        names = declared if isinstance(declared, list) else [declared]
        unknown = [t for t in names if t not in TYPES]
        if unknown or not names:
            raise SchemaNotConvertible(f"Unknown type {unknown[0] if unknown else '[]'!r}", keyword="type",
                                       path=_pointer(path, "type"), unsatisfiable=not names)
        if "integer" in names and "number" in names:
            names = [t for t in names if t != "integer"]
        return list(dict.fromkeys(names))

    def typed(self, kind: str, schema: dict, path: str, depth: int) -> str:
        if kind == "string":
            return self.string(schema, path)
        if kind in ("integer", "number"):
            return self.number(schema, path, integer=kind == "integer")
        if kind == "object":
            return self.object(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        return self.base(kind)

    def alternatives(self, schema: dict, keyword: str, path: str, depth: int) -> str:
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise SchemaNotConvertible(f"'{keyword}' must be a non-empty list", keyword=keyword, path=path,
                                       unsatisfiable=True)
        base = {k: v for k, v in schema.items() if k != keyword and k in ASSERTIONS}
        merged, first_error = [], None
        for index, branch in enumerate(branches):
            where = _pointer(_pointer(path, keyword), index)
            try:
                merged.append((where, self.merge(base, branch, where, depth) if base else self._plain(
                    branch, where, depth)))
            except SchemaNotConvertible as exc:  # leaving a branch out still admits only valid values
                first_error = self._worse(first_error, exc)
        if keyword == "oneOf" and len(merged) > 1:
            # a branch that is left out for a converter reason still counts: no written value may match it
            if first_error is not None and first_error.code != "unsatisfiable_schema":
                raise SchemaNotConvertible("The server cannot make sure that a value matches only one 'oneOf' "
                                           "branch", keyword="oneOf", path=_pointer(path, keyword))
            exclusive = exclusive_branches([branch for _, branch in merged], self, FORBIDDEN)
            merged = [(where, narrowed) for (where, _), narrowed in zip(merged, exclusive) if narrowed is not None]
            if not merged:
                raise SchemaNotConvertible("The server cannot tell the 'oneOf' branches apart (a value could "
                                           "match more than one)", keyword="oneOf", path=_pointer(path, keyword))
        names = []
        for where, branch in merged:
            try:
                names.append(self.visit(branch, where, depth + 1))
            except SchemaNotConvertible as exc:
                first_error = self._worse(first_error, exc)
        if not names:
            raise first_error
        return " | ".join(dict.fromkeys(names))

    @staticmethod
    def _worse(first: SchemaNotConvertible | None, exc: SchemaNotConvertible) -> SchemaNotConvertible:
        """The error to report when no branch can be written: the first, unless it only says 'unsatisfiable'."""
        if first is None or (first.code == "unsatisfiable_schema" and exc.code != "unsatisfiable_schema"):
            return exc
        return first

    # -- $ref -------------------------------------------------------------------------------

    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaNotConvertible(f"Only references within the schema ('#/...') are supported, not {ref!r}",
                                       keyword="$ref", path=_pointer(path, "$ref"))
        target = self.root_schema
        for part in [p for p in ref[1:].split("/") if p != ""] if ref not in ("#", "#/") else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif (isinstance(target, list) and part.isascii() and part.isdigit() and len(part) <= 9  # "²", 5000 digits
                  and int(part) < len(target)):
                target = target[int(part)]
            else:
                raise SchemaNotConvertible(f"The reference {ref!r} points to nothing in the schema",
                                           keyword="$ref", path=_pointer(path, "$ref"))
        return target

    def ref_rule(self, ref, path: str, depth: int) -> str:
        if isinstance(ref, str) and ref in self.ref_rules:
            return self.ref_rules[ref]
        target = self.resolve(ref, path)
        mark = self._mark()
        name = self._fresh("ref-" + ref)
        self.ref_rules[ref] = name
        self.rules[name] = ""  # reserved: the target may refer back to it
        try:
            self.rules[name] = self.visit(target, ref[1:] or "/", depth + 1)
        except BaseException:
            self._rollback(mark)
            raise
        return name

    # -- allOf ------------------------------------------------------------------------------

    def merge(self, a, b, path: str, depth: int) -> dict:
        """One schema that admits what both `a` and `b` admit (allOf), or SchemaNotConvertible."""
        if depth > MAX_DEPTH:
            raise SchemaNotConvertible("The schema nests or recurses too deeply", keyword="allOf", path=path)
        a, b = self._plain(a, path, depth), self._plain(b, path, depth)
        merged = dict(a)
        for key, value in b.items():
            if key not in merged or merged[key] == value or key not in ASSERTIONS:
                merged.setdefault(key, value)
                continue
            mine = merged[key]
            if key == "type":
                left = set(mine if isinstance(mine, list) else [mine])
                right = set(value if isinstance(value, list) else [value])
                if "number" in left and "integer" in right:
                    left.add("integer")
                if "number" in right and "integer" in left:
                    right.add("integer")
                both = [t for t in TYPES if t in left and t in right]
                if not both:
                    raise SchemaNotConvertible("'allOf' parts ask for different types", keyword="type",
                                               path=path, unsatisfiable=True)
                merged[key] = both if len(both) > 1 else both[0]
            elif key == "properties":
                merged[key] = {**mine, **{k: ({"allOf": [mine[k], v]} if k in mine else v) for k, v in value.items()}}
            elif key in ("required", FORBIDDEN):
                merged[key] = list(dict.fromkeys([*mine, *value]))
            elif key in ("minimum", "minLength", "minItems", "minProperties") and _is_number(mine) and _is_number(value):
                merged[key] = max(mine, value)
            elif key in ("maximum", "maxLength", "maxItems", "maxProperties") and _is_number(mine) and _is_number(value):
                merged[key] = min(mine, value)
            elif key == "exclusiveMinimum" and _is_number(mine) and _is_number(value):
                merged[key] = max(mine, value)
            elif key == "exclusiveMaximum" and _is_number(mine) and _is_number(value):
                merged[key] = min(mine, value)
            elif key == "enum" and isinstance(mine, list) and isinstance(value, list):
                merged[key] = [v for v in mine if any(compact(v) == compact(w) for w in value)]
            elif key in ("items", "additionalProperties") and not isinstance(mine, list) and not isinstance(value, list):
                merged[key] = False if (mine is False or value is False) else {"allOf": [mine, value]}
            elif key in ("anyOf", "oneOf") and isinstance(mine, list) and isinstance(value, list):
                if len(mine) * len(value) > MAX_BRANCHES:
                    raise SchemaNotConvertible(f"Too many combinations of '{key}' branches", keyword=key, path=path)
                merged[key] = [{"allOf": [x, y]} for x in mine for y in value]
            elif key == "allOf" and isinstance(mine, list) and isinstance(value, list):
                merged[key] = [*mine, *value]
            elif key == "uniqueItems":
                merged[key] = bool(mine or value)
            else:
                raise SchemaNotConvertible(f"Two different values of '{key}' must both hold", keyword=key,
                                           path=path, unsatisfiable=key == "const")
        for one, other in ((a, b), (b, a)):  # additionalProperties: false forbids the other part's properties
            if one.get("additionalProperties") is False and "properties" in merged:
                allowed = set(one.get("properties", {}))
                merged["properties"] = {k: v for k, v in merged["properties"].items() if k in allowed}
        return merged

    def _plain(self, schema, path: str, depth: int) -> dict:
        """`schema` as a dict without a top-level $ref (merged in)."""
        if schema is True:
            return {}
        if schema is False:
            return {"not": {}}
        if not isinstance(schema, dict):
            raise SchemaNotConvertible("A schema must be an object or a boolean", keyword="type", path=path)
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.merge(self.resolve(schema["$ref"], path), rest, path, depth + 1)
        if any(k in schema for k in ("if", "then", "else")):
            return self._unfold_conditional(schema, path)
        return schema

    # -- values -----------------------------------------------------------------------------

    def values(self, values: list, schema: dict, keyword: str, path: str) -> str:
        if len(values) > MAX_ENUM_VALUES:
            raise SchemaNotConvertible(f"'{keyword}' lists {len(values):,} values; at most {MAX_ENUM_VALUES:,} are "
                                       "supported", keyword=keyword, path=_pointer(path, keyword))
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        kept = [v for v in values if self.fits(v, rest)]
        if not kept:
            detail = "'enum' lists no value" if not values else f"No value of '{keyword}' fits the rest of the schema"
            raise SchemaNotConvertible(detail, keyword=keyword, path=_pointer(path, keyword), unsatisfiable=True)
        return " | ".join(dict.fromkeys(literal(compact(v)) for v in kept))

    def fits(self, value, schema: dict) -> bool:
        """A light check that an enum/const value meets the schema's other keywords (type, bounds, lengths)."""
        declared = schema.get("type")
        if declared is not None:
            kinds = set(declared if isinstance(declared, list) else [declared])
            kind = _type_of(value)
            if kind not in kinds and not (kind == "integer" and "number" in kinds):
                return False
        if _is_number(value):
            low, high = schema.get("minimum"), schema.get("maximum")
            if _is_number(low) and value < low or _is_number(high) and value > high:
                return False
            low, high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
            if _is_number(low) and value <= low or _is_number(high) and value >= high:
                return False
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
                return False
            try:
                if "pattern" in schema and not self.search(schema["pattern"], value, "pattern", "/"):
                    return False
            except (re.error, TypeError):
                return False
        if isinstance(value, dict):
            if any(k not in value for k in schema.get("required", [])):
                return False
            properties = schema.get("properties") or {}
            extra = schema.get("additionalProperties", True)
            for key, item in value.items():
                sub = properties.get(key, extra)
                if sub is False or (isinstance(sub, dict) and not self.fits(item, sub)):
                    return False
        if isinstance(value, list):
            items = schema.get("items", True)
            if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
                return False
            if isinstance(items, dict) and not all(self.fits(item, items) for item in value):
                return False
        if "enum" in schema and isinstance(schema["enum"], list) and compact(value) not in {
                compact(v) for v in schema["enum"]}:
            return False
        if "const" in schema and compact(value) != compact(schema["const"]):
            return False
        return True

    # -- strings ----------------------------------------------------------------------------

    def _count(self, schema: dict, low_key: str, high_key: str, path: str) -> tuple[int, int | None]:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is not None and (not _is_number(value) or value < 0 or value != int(value)):
                raise SchemaNotConvertible(f"'{key}' must be a whole number >= 0", keyword=key,
                                           path=_pointer(path, key))
        low, high = int(low), (int(high) if high is not None else None)
        if high is not None and low > high:
            raise SchemaNotConvertible(f"'{low_key}' {low} is above '{high_key}' {high}", keyword=low_key,
                                       path=_pointer(path, low_key), unsatisfiable=True)
        if low > MAX_REPEAT:
            raise SchemaNotConvertible(f"'{low_key}' above {MAX_REPEAT} is not supported", keyword=low_key,
                                       path=_pointer(path, low_key))
        if high is not None and high > MAX_REPEAT:
            high = MAX_REPEAT  # fewer is still valid
        return low, high

    def string(self, schema: dict, path: str) -> str:
        low, high = self._count(schema, "minLength", "maxLength", path)
        fmt, pattern = schema.get("format"), schema.get("pattern")
        quote = r'"\""'
        if pattern is not None:
            if fmt in FORMATS:
                raise SchemaNotConvertible("'pattern' together with 'format'", keyword="pattern",
                                           path=_pointer(path, "pattern"))
            body = pattern_grammar(pattern, _pointer(path, "pattern"), low, high)
            return f"{quote} {self.add(path + '-pattern', body)} {quote}"
        if fmt in FORMATS:
            body, shortest, longest = FORMATS[fmt]
            if shortest < low or (high is not None and longest > high):
                raise SchemaNotConvertible(f"'format' {fmt!r} together with 'minLength'/'maxLength'",
                                           keyword="format", path=_pointer(path, "format"))
            return f"{quote} {self.add('format-' + fmt, body)} {quote}"
        if low == 0 and high is None:
            return self.base("string")
        self.base("char")
        repeat = f"{{{low},}}" if high is None else (f"{{{low}}}" if low == high else f"{{{low},{high}}}")
        return f"{quote} char{repeat} {quote}"

    # -- numbers ----------------------------------------------------------------------------

    def number(self, schema: dict, path: str, *, integer: bool) -> str:
        multiple = schema.get("multipleOf")
        if multiple is not None:
            if not _is_number(multiple) or multiple <= 0:
                raise SchemaNotConvertible("'multipleOf' must be a number above 0", keyword="multipleOf",
                                           path=_pointer(path, "multipleOf"))
            if multiple != 1:
                raise SchemaNotConvertible("'multipleOf' other than 1 is not supported", keyword="multipleOf",
                                           path=_pointer(path, "multipleOf"))
            integer = True
        low = high = None  # (value, exclusive, keyword)
        for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            value = schema.get(key)
            if value is None or isinstance(value, bool):
                continue
            if not _is_number(value):
                raise SchemaNotConvertible(f"'{key}' must be a number", keyword=key, path=_pointer(path, key))
            exclusive = key.startswith("exclusive") or schema.get("exclusive" + key.capitalize()) is True
            if "inimum" in key and (low is None or value > low[0] or (value == low[0] and exclusive)):
                low = (value, exclusive, key)
            if "aximum" in key and (high is None or value < high[0] or (value == high[0] and exclusive)):
                high = (value, exclusive, key)
        if low and high and (low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1]))):
            raise SchemaNotConvertible(f"'{low[2]}' {low[0]} leaves no room below '{high[2]}' {high[0]}",
                                       keyword=low[2], path=_pointer(path, low[2]), unsatisfiable=True)
        if low and low[0] < -UNBOUNDED_BEYOND:  # the grammar never writes numbers that far out anyway
            low = None
        if high and high[0] > UNBOUNDED_BEYOND:
            high = None
        if integer:
            if low is None and high is None:
                return self.base("integer")
            lo = None if low is None else (math.floor(low[0]) + 1 if low[1] and low[0] == math.floor(low[0])
                                           else math.ceil(low[0]))
            hi = None if high is None else (math.ceil(high[0]) - 1 if high[1] and high[0] == math.ceil(high[0])
                                            else math.floor(high[0]))
            body = integer_range(lo, hi)
            if body is None:
                keyword = (low or high)[2]
                raise SchemaNotConvertible("No whole number lies between the bounds", keyword=keyword,
                                           path=_pointer(path, keyword), unsatisfiable=True)
            return f"({body})"
        if low is None and high is None:
            return self.base("number")
        lo, lo_ex = (None, False) if low is None else (
            (int(low[0]), low[1]) if low[0] == math.floor(low[0]) else (math.ceil(low[0]), False))
        hi, hi_ex = (None, False) if high is None else (
            (int(high[0]), high[1]) if high[0] == math.floor(high[0]) else (math.floor(high[0]), False))
        body = bounded_number(lo, lo_ex, hi, hi_ex)
        if body is None:
            keyword = (low or high)[2]
            raise SchemaNotConvertible("Number bounds closer than whole numbers are not supported", keyword=keyword,
                                       path=_pointer(path, keyword))
        return f"({body})"

    # -- objects ----------------------------------------------------------------------------

    def object(self, schema: dict, path: str, depth: int) -> str:
        properties = schema.get("properties", {}) or {}
        required = schema.get("required", []) or []
        patterns = schema.get("patternProperties") or {}
        if not all(isinstance(x, dict) for x in (properties, patterns)) or not isinstance(required, list):
            raise SchemaNotConvertible("'properties' must be an object and 'required' a list",
                                       keyword="properties", path=path)
        extra = schema.get("additionalProperties", True)
        names_schema = schema.get("propertyNames", True)
        forbidden = set(schema.get(FORBIDDEN, []))
        required = list(dict.fromkeys(required))

        def matching(name: str) -> list:
            found = []
            for pattern, value in patterns.items():
                try:
                    hit = self.search(pattern, name, "patternProperties", path)
                    if hit:
                        found.append(value)
                except (re.error, TypeError):
                    raise SchemaNotConvertible("A 'patternProperties' key is not a regular expression",
                                               keyword="patternProperties", path=path) from None
            return found

        candidates = {}  # name -> schema, in declared order, then required names declared nowhere else
        for name in [*properties, *[r for r in required if r not in properties]]:
            parts = ([properties[name]] if name in properties else []) + matching(name)
            if not parts:
                parts = [extra] if extra is not True else [{}]
            if name in forbidden and name in required:
                raise SchemaNotConvertible(f"Required property {name!r} must be left out to satisfy 'not' or "
                                           "'dependencies'", keyword="not", path=_pointer(path, "required"))
            if name in forbidden or parts[0] is False or not self.fits(name, names_schema if isinstance(
                    names_schema, dict) else {}) or any(p is False for p in parts):
                if name in required:
                    raise SchemaNotConvertible(f"Required property {name!r} is not allowed by the schema",
                                               keyword="required", path=_pointer(path, "required"), unsatisfiable=True)
                continue
            candidates[name] = parts[0] if len(parts) == 1 else {"allOf": parts}
        low, high = self._count(schema, "minProperties", "maxProperties", path)
        if not candidates:
            return self._map(schema, path, depth, low, high, patterns, extra, forbidden)

        members = {}
        for name, subschema in candidates.items():
            where = _pointer(_pointer(path, "properties"), name)
            try:
                members[name] = f'{literal(compact(name))} ":" {self.visit(subschema, where, depth + 1)}'
            except SchemaNotConvertible as exc:
                if name in required or exc.code != "unsatisfiable_schema":
                    raise
        optional = [name for name in members if name not in required]
        if len(required) < low:  # make optional properties required until minProperties holds
            if len(members) < low:
                raise SchemaNotConvertible("'minProperties' is more than the properties this server writes",
                                           keyword="minProperties", path=_pointer(path, "minProperties"),
                                           unsatisfiable=extra is False and not patterns)
            required = required + optional[: low - len(required)]
            optional = [name for name in optional if name not in required]
        if high is not None:
            if len(required) > high:
                raise SchemaNotConvertible(f"'required' names more than 'maxProperties' {high} properties",
                                           keyword="maxProperties", path=_pointer(path, "maxProperties"),
                                           unsatisfiable=True)
            optional = optional[: high - len(required)]
        order = [name for name in members if name in required or name in optional]
        first_required = next((i for i, name in enumerate(order) if name in required), None)
        if first_required is None:
            body = self._optional_tail([members[name] for name in order], path)
        else:  # in declared order: optional ones before the first required end with a comma, later ones start with one
            parts = [f'({members[name]} ",")?' for name in order[:first_required]]
            parts.append(members[order[first_required]])
            parts += [f'"," {members[name]}' if name in required else f'("," {members[name]})?'
                      for name in order[first_required + 1:]]
            body = " ".join(parts)
        return f'"{{" {body} "}}"' if body else r'"{" "}"'

    def _map(self, schema: dict, path: str, depth: int, low: int, high: int | None, patterns: dict, extra,
             forbidden: set) -> str:
        """An object without declared properties: keys and values from patternProperties or additionalProperties."""
        names_schema = schema.get("propertyNames", True)
        if patterns:
            pattern, value = next(iter(patterns.items()))
            key_schema = {"type": "string", "pattern": pattern}
            if names_schema not in (True, {}):
                key_schema = {"allOf": [key_schema, names_schema]}
        elif extra is False:
            key_schema = value = None
        else:
            value = extra if extra is not True else {}
            key_schema = {"type": "string"} if names_schema in (True, {}) else {"allOf": [{"type": "string"},
                                                                                            names_schema]}
        if key_schema is None or high == 0:
            if low > 0:
                raise SchemaNotConvertible("'minProperties' asks for properties the schema forbids",
                                           keyword="minProperties", path=_pointer(path, "minProperties"),
                                           unsatisfiable=True)
            return r'"{" "}"'
        if forbidden:
            raise SchemaNotConvertible("'not'/'dependencies' on the keys of a free-form object",
                                       keyword="dependencies", path=path)
        if low > 1:  # the grammar cannot keep free-form keys distinct
            raise SchemaNotConvertible("'minProperties' above 1 on a free-form object is not supported",
                                       keyword="minProperties", path=_pointer(path, "minProperties"))
        try:
            key = self.visit(key_schema, _pointer(path, "propertyNames"), depth + 1)
            item = self.visit(value, _pointer(path, "additionalProperties"), depth + 1)
        except SchemaNotConvertible as exc:
            if low > 0 or exc.code != "unsatisfiable_schema":
                raise
            return r'"{" "}"'
        member = self.add(path + "-member", f'{key} ":" {item}')
        return self._sequence('"{"', member, '"}"', low, high)

    def _optional_tail(self, members: list[str], path: str) -> str:
        """Optional members in order, each present or not, with commas only between those written."""
        rests: list[str | None] = [None] * (len(members) + 1)
        for index in range(len(members) - 1, 0, -1):  # rest-i ::= ("," m_i)? rest-(i+1)
            body = f'("," {members[index]})?' + (f" {rests[index + 1]}" if rests[index + 1] else "")
            rests[index] = self.add(f"{path}-rest{index}", body)
        firsts = [f"{member} {rests[i + 1]}" if rests[i + 1] else member for i, member in enumerate(members)]
        return "(" + " | ".join(firsts) + ")?"

    def _sequence(self, open_: str, item: str, close: str, low: int, high: int | None) -> str:
        if high == 0:
            return f"{open_} {close}"
        more_low, more_high = max(low - 1, 0), (None if high is None else high - 1)
        if more_high is None:
            more = "*" if more_low == 0 else f"{{{more_low},}}"
        else:
            more = f"{{{more_low},{more_high}}}" if more_low != more_high else f"{{{more_low}}}"
        inner = f'{item} ("," {item}){more}' if more_high != 0 else item
        return f"{open_} {inner} {close}" if low > 0 else f"{open_} ({inner})? {close}"

    # -- arrays -----------------------------------------------------------------------------

    def array(self, schema: dict, path: str, depth: int) -> str:
        low, high = self._count(schema, "minItems", "maxItems", path)
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, schema.get("additionalItems", True)
        if prefix is not None:
            if not isinstance(prefix, list):
                raise SchemaNotConvertible("'prefixItems' must be a list", keyword="prefixItems", path=path)
            count = max(len(prefix), low) if high is None else min(max(len(prefix), low), high)
            if count > len(prefix) and items is False:
                raise SchemaNotConvertible("'minItems' asks for more items than the schema allows",
                                           keyword="minItems", path=_pointer(path, "minItems"), unsatisfiable=True)
            if schema.get("uniqueItems") is True and count > 1:
                raise SchemaNotConvertible("'uniqueItems' on a tuple of more than one item is not supported",
                                           keyword="uniqueItems", path=_pointer(path, "uniqueItems"))
            names = [self.visit(prefix[i] if i < len(prefix) else items, _pointer(path, i), depth + 1)
                     for i in range(count)]
            return '"[" ' + ' "," '.join(names) + ' "]"' if names else r'"[" "]"'
        if items is False:
            if low > 0:
                raise SchemaNotConvertible("'minItems' asks for items the schema forbids", keyword="minItems",
                                           path=_pointer(path, "minItems"), unsatisfiable=True)
            return r'"[" "]"'
        if schema.get("uniqueItems") is True:
            if low > 1:
                raise SchemaNotConvertible("'uniqueItems' with 'minItems' above 1 is not supported",
                                           keyword="uniqueItems", path=_pointer(path, "uniqueItems"))
            high = 1 if high is None else min(high, 1)
        item = self.visit(items if items is not True else {}, _pointer(path, "items"), depth + 1)
        return self._sequence('"["', item, '"]"', low, high)


"""`oneOf` made exact: a value must match exactly one branch, so the grammar may write a branch only where
none of its values can also match another branch.

A branch is kept when, against every other branch, one of these proves its values fail the other:
disjoint types, const/enum values the other rejects, a property the other requires that this branch never
writes (or that it can be told never to write, narrowing it), a property this branch requires that the
other does not allow (`additionalProperties: false`), or a required property whose schemas in the two branches are themselves disjoint (a
discriminator such as `"kind": {"const": "circle"}`). Branches that cannot be proven apart are left out;
the grammar still admits only valid values. The proofs read only a branch's own top-level keywords.
"""

from __future__ import annotations

from .errors import SchemaNotConvertible

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")

COMBINATORS = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependencies", "dependentRequired",
               "dependentSchemas", "$ref", "patternProperties", "unevaluatedProperties")


def exclusive_branches(branches: list[dict], converter, forbidden_key: str) -> list[dict | None]:
    """Per branch (a plain dict): itself, narrowed so that its values match no other branch, or None where
    that cannot be shown (the branch is not to be written)."""
    branches = [_flat(branch, converter) for branch in branches]
    kept = []
    for index, branch in enumerate(branches):
        narrowed = branch
        for other_index, other in enumerate(branches):
            if other_index == index:
                continue
            narrowed = _apart(narrowed, other, converter, forbidden_key)
            if narrowed is None:
                break
        kept.append(narrowed)
    return kept


def _kinds(schema: dict, converter, written: bool) -> set[str]:
    """The JSON types of a schema's values: of the values its grammar writes (`written`; the converter reads
    type hints such as `properties` as the type), or of every value it admits. An integer is also a number."""
    declared = schema.get("type")
    if written:
        try:
            kinds = set(converter.types(schema, ""))
        except SchemaNotConvertible:
            kinds = set(TYPES)
    elif isinstance(declared, str) and declared in TYPES:
        kinds = {declared}
    elif isinstance(declared, list) and declared and all(kind in TYPES for kind in declared):
        kinds = set(declared)
    else:
        kinds = set(TYPES)
    if "number" in kinds:
        kinds.add("integer")
    return kinds


def _apart(mine: dict, other: dict, converter, forbidden_key: str) -> dict | None:
    """`mine`, possibly narrowed, such that none of its values matches `other`; None if that cannot be shown."""
    common = _kinds(mine, converter, written=True) & _kinds(other, converter, written=False)
    if not common:
        return mine
    values = _values(mine)
    if values is not None:  # keep the values the other rejects
        kept = [value for value in values if not converter.fits(value, other)]
        if len(kept) == len(values):
            return mine
        rest = {k: v for k, v in mine.items() if k not in ("const", "enum")}
        return {**rest, "enum": kept} if kept else None
    for kind in ("string", "array"):
        if common == {kind}:
            return mine if _ranges_apart(mine, other, kind) else None
    if common <= {"integer", "number"}:
        return mine if _ranges_apart(mine, other, "number") else None
    if common != {"object"}:
        return None
    return _objects_apart(mine, other, converter, forbidden_key)


def _flat(schema, converter, depth: int = 0):
    """`schema` with its allOf merged in (as the converter writes it), or as it is where that fails."""
    if not isinstance(schema, dict) or not isinstance(schema.get("allOf"), list) or depth > 4:
        return schema
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    try:
        for part in schema["allOf"]:
            merged = converter.merge(merged, part, "", 0)
    except SchemaNotConvertible:
        return schema
    return _flat(merged, converter, depth + 1)


def _ranges_apart(mine: dict, other: dict, kind: str) -> bool:
    """Whether the length (string), item count (array) or value (number) ranges of the two cannot meet."""
    if kind == "string":
        keys = ("minLength", "maxLength", None, None)
    elif kind == "array":
        keys = ("minItems", "maxItems", None, None)
    else:
        keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    low_a, high_a = _range(mine, *keys)
    low_b, high_b = _range(other, *keys)
    return _below(high_a, low_b) or _below(high_b, low_a)


def _range(schema: dict, low_key, high_key, exclusive_low_key, exclusive_high_key):
    """((low, exclusive?) or None, (high, exclusive?) or None) of one schema."""
    def number(key):
        value = schema.get(key) if key else None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    low = max(filter(None, [(number(low_key), False) if number(low_key) is not None else None,
                            (number(exclusive_low_key), True) if number(exclusive_low_key) is not None else None]),
              default=None)
    high = min(filter(None, [(number(high_key), False) if number(high_key) is not None else None,
                             (number(exclusive_high_key), True) if number(exclusive_high_key) is not None else None]),
               default=None, key=lambda bound: (bound[0], not bound[1]))
    return low, high


def _below(high, low) -> bool:
    """Whether every value under `high` lies below every value over `low`."""
    if high is None or low is None:
        return False
    return high[0] < low[0] or (high[0] == low[0] and (high[1] or low[1]))


def _values(schema: dict) -> list | None:
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return schema["enum"]
    return None


def _objects_apart(mine: dict, other: dict, converter, forbidden_key: str) -> dict | None:
    required = set(_names(mine.get("required")))
    others_required = set(_names(other.get("required")))
    written = _written(mine, forbidden_key)
    if written is not None and others_required - written:
        return mine  # the other requires a property this branch never writes
    if other.get("additionalProperties") is False and not other.get("patternProperties") and (
            required - set(_properties(other))):
        return mine  # this branch requires a property the other does not allow
    for name in sorted(required & set(_properties(other))):
        mine_property = _flat(_properties(mine).get(name), converter)
        other_property = _flat(_properties(other)[name], converter)
        if isinstance(mine_property, dict) and isinstance(other_property, dict) and not any(
                k in mine_property for k in COMBINATORS) and _apart(mine_property, other_property, converter,
                                                                     forbidden_key) is mine_property:
            return mine  # a discriminator: the property's values differ
    if written is not None:
        for name in sorted(others_required - required):
            return {**mine, forbidden_key: [*mine.get(forbidden_key, []), name]}  # never write it
    return None


def _names(value) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _properties(schema: dict) -> dict:
    properties = schema.get("properties")
    return properties if isinstance(properties, dict) else {}


def _written(schema: dict, forbidden_key: str) -> set[str] | None:
    """The property names the grammar can write for this object schema, or None where that is open."""
    if any(k in schema for k in COMBINATORS):
        return None
    names = set(_properties(schema)) | set(_names(schema.get("required")))
    if not names:
        return None  # written as a free-form map
    return names - set(_names(schema.get(forbidden_key)))

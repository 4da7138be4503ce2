"""GBNF grammars for structured outputs: any JSON object (JSON mode), or JSON valid under a JSON Schema."""

from __future__ import annotations

import json

from .json_schema import SchemaNotConvertible, one_regex_budget, schema_grammar

__all__ = ["SchemaNotConvertible", "json_object_grammar", "json_schema_grammar", "one_regex_budget"]


def json_object_grammar() -> str:
    """Any JSON object, compact (OpenAI's JSON mode)."""
    return schema_grammar({"type": "object"})


def json_schema_grammar(schema: dict | str, *, root: str = "root") -> str:
    """A grammar whose start rule `root` matches JSON documents valid under `schema`.

    Raises SchemaNotConvertible (naming the keyword) for a schema no value satisfies or one that uses a
    keyword the grammar cannot enforce."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise SchemaNotConvertible("The schema is not JSON", keyword="type", path="/") from None
    return schema_grammar(schema, root=root)

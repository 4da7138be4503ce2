"""GBNF grammars from JSON Schemas, with llama-cpp-python's converter (imported on first use)."""

from __future__ import annotations

import json

from .errors import InvalidRequest


class SchemaNotConvertible(InvalidRequest):
    """The JSON Schema uses features the converter cannot express as a grammar."""


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's JSON mode)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: dict | str) -> str:
    """A grammar whose start rule `root` matches JSON documents valid under `schema`."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema if isinstance(schema, str) else json.dumps(schema))
    except Exception:  # the converter raises assorted errors for schemas it cannot express
        raise SchemaNotConvertible("The JSON Schema uses features that cannot be turned into a grammar.") from None

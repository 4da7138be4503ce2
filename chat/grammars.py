"""GBNF grammars for `response_format` (JSON mode), built with llama-cpp-python's converter."""

import json

from .errors import ApiError


def grammar_for_response_format(response_format: dict | None) -> str | None:
    if not response_format or response_format["type"] == "text":
        return None
    # Imported here: the inference library loads only when a request needs it.
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if response_format["type"] == "json_object":
        return JSON_GBNF
    schema = response_format["json_schema"]["schema"]
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception:  # the converter raises assorted errors for schemas it cannot express
        raise ApiError("response_format.json_schema.schema uses features this server cannot turn into a grammar.",
                       param="response_format", code="unsupported_schema") from None

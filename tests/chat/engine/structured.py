"""Shared by the structured-output tests: generate under a schema's grammar and judge the reply."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jsonschema

from chat.engine import SamplingParams
from chat.engine.grammars import json_schema_grammar

PROMPT = "Reply with JSON that matches this JSON Schema:\n{schema}"
SCHEMA_CHARS_IN_PROMPT = 1200


@dataclass
class Reply:
    schema: dict
    text: str
    finish_reason: str

    @property
    def cut(self) -> bool:
        return self.finish_reason == "length"

    def problem(self) -> str | None:
        """Why this finished reply is not a valid instance of its schema; None when it is (or was cut)."""
        if self.cut:
            return None
        try:
            value = json.loads(self.text)  # strict: raw control characters in strings are errors
        except ValueError as exc:
            return f"not JSON ({exc}): {self.text[:200]!r}"
        cls = jsonschema.validators.validator_for(self.schema)
        validator = cls(self.schema, format_checker=cls.FORMAT_CHECKER)  # the formats of the schema's draft
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        return None if error is None else f"invalid ({error.message[:200]}): {self.text[:200]!r}"


def generate_under_schemas(engine, schemas: list[dict], *, max_tokens: int, seed: int = 0,
                           temperature: float = 1.0, workers: int = 4) -> list[Reply]:
    """One reply per schema, `workers` requests in flight at once (the engine batches them; no more than its
    slots, so that none waits in its queue past the queue timeout on a busy machine)."""
    def one(index_schema):
        index, schema = index_schema
        text = json.dumps(schema, separators=(",", ":"))[:SCHEMA_CHARS_IN_PROMPT]
        prompt = engine.render_chat([{"role": "user", "content": PROMPT.format(schema=text)}])
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + index,
                                grammar=json_schema_grammar(schema))
        completion = engine.generate(prompt, params)
        return Reply(schema, completion.text, completion.finish_reason)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, enumerate(schemas)))

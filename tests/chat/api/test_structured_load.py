"""Constrained replies under concurrent, mixed load (schemas, JSON mode, tools, plain text, streams) all parse and
validate: grammars of different requests batched together never leak into one another."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.smollm2

TIMEOUT = 300
ASK = [{"role": "user", "content": "Describe a small town in JSON."}]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "population": {"type": "integer", "minimum": 1, "maximum": 5000}},
     "required": ["name", "population"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"founded": {"type": "string", "format": "date"},
                                      "motto": {"type": "string", "maxLength": 60}}, "required": ["founded"]},
    {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"enum": ["none", "many"]}]},
]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": WEATHER}}]


def post(live_api, body: dict, *, stream: bool = False) -> tuple[int, str, dict]:
    """(status, the reply's text or tool-call arguments, the response body or last chunk)."""
    headers = {"Authorization": f"Bearer {live_api.keys['alice']}", "Cache-Control": "no-cache"}
    url = f"{live_api.base_url}/chat/completions"
    if not stream:
        response = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        data = response.json()
        if response.status_code != 200:
            return response.status_code, "", data
        message = data["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        return 200, calls[0]["function"]["arguments"] if calls else (message["content"] or ""), data
    parts, finish = [], None
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk.get("choices") or []:
                    parts.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
        return response.status_code, "".join(parts), {"choices": [{"finish_reason": finish}]}


def schema_body(schema, seed):
    return {"messages": ASK, "max_tokens": 120, "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "town", "schema": schema}}}


def test_constrained_replies_under_concurrent_mixed_load_parse_and_validate(live_api):
    jobs = []  # (body, stream, schema the reply must validate against, or None for free text)
    for round_ in range(2):
        for index, schema in enumerate(SCHEMAS):
            jobs.append((schema_body(schema, 100 * round_ + index), index % 2 == 1, schema))
        jobs.append(({"messages": ASK, "max_tokens": 120, "temperature": 1.0, "seed": round_,
                      "response_format": {"type": "json_object"}}, round_ == 1, {"type": "object"}))
        jobs.append(({"messages": ASK, "max_tokens": 40, "temperature": 1.0, "seed": round_}, round_ == 0, None))
        jobs.append(({"messages": [{"role": "user", "content": "Weather in Oslo for 3 days?"}], "max_tokens": 80,
                      "temperature": 1.0, "seed": round_, "tools": TOOLS, "tool_choice": "required"}, False, WEATHER))
        jobs.append(({"messages": ASK, "max_tokens": 30, "temperature": 1.0, "seed": round_, "logprobs": True,
                      "top_logprobs": 2, "stop": ["\n"]}, False, None))

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: post(live_api, job[0], stream=job[1]), jobs))

    checked = 0
    for (body, _stream, schema), (status, text, data) in zip(jobs, results):
        assert status == 200, data
        if schema is None:
            continue
        finish = (data.get("choices") or [{}])[0].get("finish_reason")
        if finish == "length":
            continue
        value = json.loads(text)  # strict: no raw control characters
        jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        checked += 1
    assert checked >= 10  # of 12 constrained replies, few may be cut by max_tokens

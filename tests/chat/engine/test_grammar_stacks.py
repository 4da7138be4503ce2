"""The grammar rehearsal (chat/engine/grammar_stacks.py): alternatives that start alike and nest would make llama.cpp
follow thousands of parses at once (one token ran for minutes on the scheduler thread); they are found before the
grammar is used, common schemas are not, and the rehearsal parses GBNF as llama.cpp does."""

import dataclasses
import json
from pathlib import Path

import pytest

from chat.engine.grammar_stacks import MAX_STACKS, _Grammar, _Stacks, most_stacks
from chat.engine.grammars import json_schema_grammar
from tests.factories import make_api_client, write_tiny_gguf

from .gbnf_check import GbnfChecker

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "json_schemas.json").read_text())


def nested_arrays(branches: int) -> dict:
    """The audit's schema: `branches` array alternatives of itself, each reading "[" first."""
    alternatives = [{"type": "array", "items": {"$ref": "#/$defs/x"}, "maxItems": k} for k in range(1, branches + 1)]
    return {"$defs": {"x": {"anyOf": [*alternatives, {"type": "null"}]}}, "$ref": "#/$defs/x"}


@pytest.mark.parametrize("branches", [8, 16, 64])
def test_alternatives_that_start_alike_and_nest_are_found_out(branches):
    assert most_stacks(json_schema_grammar(nested_arrays(branches))) >= MAX_STACKS


@pytest.mark.parametrize("padding", [400, 900])
def test_ambiguity_behind_many_paths_is_found_all_the_same(padding):
    """Text before the ambiguous rule (hundreds of optional properties, each a path) filled a beam that follows only
    the widest stack sets, and a deep chain of them overflowed a recursive expansion: the rule is rehearsed alone."""
    properties = {f"p{number}": {"type": "null"} for number in range(padding)}
    schema = {"type": "object", "properties": {**properties, "zz": nested_arrays(64)["$defs"]["x"]},
              "$defs": nested_arrays(64)["$defs"]}
    assert most_stacks(json_schema_grammar(schema)) >= MAX_STACKS


def test_a_grammar_too_large_to_rehearse_is_refused():
    schema = {"type": "object", "properties": {f"s{n}": {"type": "string", "maxLength": 1900 + n} for n in range(400)},
              "required": [f"s{n}" for n in range(400)]}
    assert most_stacks(json_schema_grammar(schema)) >= MAX_STACKS


@pytest.mark.parametrize("schema", [
    # Alike at first, parted by a property name before anything nests.
    {"$defs": {"e": {"anyOf": [
        {"type": "object", "properties": {"op": {"type": "string"}, "args": {"type": "array", "items": {"$ref": "#/$defs/e"}}},
         "required": ["op", "args"]},
        {"type": "object", "properties": {"value": {"type": "number"}}, "required": ["value"]}]}}, "$ref": "#/$defs/e"},
    # The same property name, but only one branch nests: the other ends at the next "{".
    {"$defs": {"e": {"anyOf": [{"type": "object", "properties": {"k": {"$ref": "#/$defs/e"}}, "required": ["k"]},
                               {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]},
                               {"type": "null"}]}}, "$ref": "#/$defs/e"},
    {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "number"}]}},
    {"type": "object"},
])
def test_alternatives_that_part_before_they_nest_are_not_refused(schema):
    assert most_stacks(json_schema_grammar(schema)) < 16


def test_every_schema_of_the_fixtures_stays_far_below_the_limit():
    counts = []
    for case in FIXTURES:
        try:
            counts.append(most_stacks(json_schema_grammar(case["schema"])))
        except Exception:  # noqa: BLE001 - schemas the converter refuses are other tests' business
            continue
    assert len(counts) > 50 and max(counts) < MAX_STACKS // 4


def rehearsal_accepts(gbnf: str, text: str) -> bool:
    grammar = _Grammar(gbnf)
    stacks_of, stacks = _Stacks(grammar, [0]), set()
    root = grammar.names["root"]
    for index, body in enumerate(grammar.rules[root]):
        stacks_of.advance(((root, index, 0),) if body else (), stacks)
    stacks = frozenset(stacks)
    for char in text:
        stacks = stacks_of.accept(stacks, ord(char))
    return () in stacks


@pytest.mark.smollm2
def test_the_rehearsal_reads_gbnf_as_llama_cpp_does(smollm2_gguf):
    grammars = [
        r'root ::= "ab"{2,3} [x-z]* ("q" | [^a-c\x00-\x1F]) "\"" ', r'root ::= ([0-9]{1,3} ",")+ "end"?',
        json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 300},
                                                              "s": {"type": "string", "maxLength": 3}}}),
    ]
    texts = ["abab", "ababab", "ababx", "ababxyq\"", "ababd\"", "ababa\"", "abababab", "12,3,", "12,3,end", "1234,",
             '{"n":-5}', '{"n":301}', '{"n":7,"s":"abc"}', '{"s":"abcd"}', '{"n":300,"s":"\\u00e9"}', "{}"]
    checker = GbnfChecker(smollm2_gguf)
    try:
        for grammar in grammars:
            for text in texts:
                assert rehearsal_accepts(grammar, text) == checker.accepts(grammar, text), (grammar, text)
    finally:
        checker.close()


@pytest.fixture
def tiny_site(settings, tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=tuple(
        dataclasses.replace(m, path=str(model), context_length=1024) for m in settings.LLMSITE.models))
    settings.API_RATE_LIMIT = ""


@pytest.mark.django_db
@pytest.mark.parametrize("where", ["response_format", "tools"])
def test_a_request_whose_grammar_is_too_ambiguous_is_a_400_naming_its_field(tiny_site, where):
    schema = nested_arrays(64)
    body = {"messages": [{"role": "user", "content": "Write [[[["}], "max_tokens": 4}
    if where == "response_format":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    else:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": schema}, "required": ["a"], "$defs": schema["$defs"]}}}]
        body["tool_choice"] = "required"
    response = make_api_client("mallory").post("/v1/chat/completions", body, format="json",
                                               HTTP_CACHE_CONTROL="no-cache")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "grammar_too_ambiguous" and error["param"] == where

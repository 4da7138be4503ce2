"""What one request's grammar may cost the others: the scheduler's thread samples every stream of a model, so a
grammar that is slow to follow holds all of them. Patterns whose nested repetitions explode in llama.cpp's grammar
sampler are refused up front; what stays slow is stopped by a CPU allowance; one request's tools share one budget
for checking their patterns against their values."""

import pytest

from chat.engine import SamplingParams
from chat.engine.backends import llama_cpp as llama_cpp_backend
from chat.engine.backends.constrained import GrammarTooCostly
from chat.engine.grammars import SchemaNotConvertible, json_schema_grammar

PROMPT = "hello world, the capital of france is"


@pytest.mark.parametrize("pattern", [
    r"^((a{1,20}){10,20}){10,20}$",  # measured before: 0.1-0.3 s of the scheduler's thread a token, 3.1 s at worst
    r"^((a{1,20}){1,20}){1,20}$",  # 1.7 s a token after 40 characters
    r"^(((a{1,8}){1,8}){1,8}){1,8}$",  # 1.07 s a token
    r"^(a{1,20}){15}$",  # a fixed count of something variable: as many ways to share the characters out
    r"^(x|a{1,30}){1,30}$",
])
def test_patterns_that_nest_variable_repetitions_deeply_are_refused(pattern):
    with pytest.raises(SchemaNotConvertible, match="nests repetitions") as raised:
        json_schema_grammar({"type": "string", "pattern": pattern})
    assert raised.value.keyword == "pattern"


@pytest.mark.parametrize("pattern", [
    r"^\d{1,3}(\.\d{1,3}){3}$",  # IPv4
    r"^([a-z0-9-]{1,63}\.)+[a-z]{2,}$",  # a host name
    r"^(\w+\s?){1,10}$",
    r"^[A-Z][a-z]{1,30} [A-Z][a-z]{1,30}$",
    r"^(a{20}){20}$",  # fixed all through: one way only
    r"^[a-z]{1,1000}$",
    r"^(a{1,8}){1,8}$",
])
def test_common_patterns_still_convert(pattern):
    assert json_schema_grammar({"type": "string", "pattern": pattern})


def test_a_reply_whose_grammar_takes_more_than_its_allowance_fails_and_no_other(registry, monkeypatch):
    monkeypatch.setattr(llama_cpp_backend, "GRAMMAR_SECONDS_FIRST", -1.0)  # any grammar work is too much
    engine = registry.get("tiny-llama")
    plain = engine.submit(PROMPT, SamplingParams(max_tokens=6, temperature=0))
    constrained = engine.submit(PROMPT, SamplingParams(max_tokens=6, grammar='root ::= [a-z ]+'))
    with pytest.raises(GrammarTooCostly, match="took too long"):
        for _ in constrained:
            pass
    assert "".join(plain) is not None and plain.result.finish_reason in ("length", "stop")
    monkeypatch.undo()
    again = engine.generate(PROMPT, SamplingParams(max_tokens=6, grammar='root ::= [a-z ]+'))  # within the allowance
    assert again.finish_reason in ("length", "stop") and again.text


def test_one_request_with_many_tools_gets_one_regex_budget_not_one_per_tool(monkeypatch):
    """Each tool's schema was checked by a Converter with a REGEX_SECONDS budget of its own for matching its
    `pattern` against its enum values: 128 tools spent 13-32 s of CPU in one request. Simulated with a clock that
    each regex search advances by most of what it may spend."""
    from chat.engine.json_schema import converter
    from chat.errors import ApiError
    from chat.tooling.grammar import tool_call_grammar
    from chat.tooling.requests import tool_request_from

    clock, spent = [0.0], [0.0]
    real_search = converter.regex.search

    def slow_search(pattern, text, timeout=None):
        step = min(timeout, converter.REGEX_SECONDS * 0.8)
        clock[0] += step
        spent[0] += step
        return real_search(pattern, text)

    monkeypatch.setattr(converter.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(converter.regex, "search", slow_search)
    parameters = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a+$", "enum": ["aa"]}},
                  "required": ["x"]}
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}} for i in range(128)]
    request = tool_request_from(tools=tools, tool_choice="required", parallel_tool_calls=None)
    with pytest.raises(ApiError, match="take too long"):
        tool_call_grammar(request)
    assert spent[0] <= converter.REGEX_SECONDS

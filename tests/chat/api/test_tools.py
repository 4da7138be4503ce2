"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) against a live server with the real SmolLM2 model."""

import json

import httpx
import jsonschema
import pytest

from chat.engine.tool_call_text import ToolCallText, UnofferedToolCall
from chat.tooling.calls import ToolCallReader, tool_reply

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache"}  # every reply is generated, so a test can fail
TIMEOUT = 300  # grammar-constrained sampling is slow on a busy 2-core machine; no test asserts time
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"]}
ADD_PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                            "parameters": WEATHER_PARAMETERS}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                        "parameters": ADD_PARAMETERS}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def assert_valid_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def create(live_api, **options):
    options.setdefault("max_tokens", 80)
    return live_api.client().with_options(timeout=TIMEOUT).chat.completions.create(
        model=MODEL, temperature=0, extra_headers=NO_CACHE, **options)


def post(live_api, body: dict) -> httpx.Response:
    return httpx.post(f"{live_api.base_url}/chat/completions", json={"model": MODEL, **body}, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {live_api.keys['alice']}", **NO_CACHE})


def test_required_returns_calls_whose_arguments_validate(live_api):
    reply = create(live_api, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call)
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_required_streamed_with_the_sdk_stream_helper(live_api):
    events = []
    with live_api.client().with_options(timeout=TIMEOUT).chat.completions.stream(
            model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80,
            parallel_tool_calls=False, extra_headers=NO_CACHE) as stream:  # one call: the helper refuses "length"
        for event in stream:
            events.append(event)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        assert_valid_call(call)
    # The helper saw argument fragments arrive and end for every call.
    fragments = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(fragments) > len(done) >= 1
    assert [e.arguments for e in done] == [call.function.arguments for call in choice.message.tool_calls]


def test_streamed_deltas_send_index_id_and_name_first(live_api):
    stream = create(live_api, messages=QUESTION, tools=[WEATHER], tool_choice="required", stream=True)
    calls = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = calls[0]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "get_weather"
    later = [delta for delta in calls[1:] if delta.index == 0]
    assert later and all(delta.id is None and delta.function.name is None for delta in later)
    arguments = first.function.arguments + "".join(delta.function.arguments for delta in later)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


def test_named_tool_choice_calls_that_function(live_api):
    reply = create(live_api, messages=QUESTION, tools=[WEATHER, ADD],
                   tool_choice={"type": "function", "function": {"name": "add"}})
    calls = reply.choices[0].message.tool_calls
    assert calls and {call.function.name for call in calls} == {"add"}
    for call in calls:
        assert_valid_call(call)


def test_parallel_tool_calls_false_gives_one_call(live_api):
    reply = create(live_api, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required",
                   parallel_tool_calls=False)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and reply.choices[0].finish_reason == "tool_calls"
    assert_valid_call(calls[0])


def test_tool_choice_none_never_calls(live_api):
    for stream in (False, True):
        reply = create(live_api, messages=[{"role": "user", "content": "Call get_weather for Paris."}],
                       tools=[WEATHER], tool_choice="none", max_tokens=40, stream=stream)
        if stream:
            chunks = [c for c in reply if c.choices]
            assert not any(c.choices[0].delta.tool_calls for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content.strip()
            assert reply.choices[0].finish_reason in ("stop", "length")


def test_history_with_a_tool_result_gets_a_text_answer(live_api):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = [*QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees celsius."}]
    reply = create(live_api, messages=messages, tools=[WEATHER], max_tokens=48)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content.strip()


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*QUESTION, {"role": "tool", "content": "18 degrees"}]}, "messages[1].tool_call_id"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None}]}, "messages[1].content"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [  # was a 500 (unhashable id)
        {"id": ["x"], "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "user", "content": "And now?"}]},
     "messages[1].tool_calls[0].id"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {  # was a 500 (a list as format)
        "type": "object", "properties": {"d": {"type": "string", "format": ["date"]}}}}}]},
     "tools[0].function.parameters"),
])
def test_invalid_tool_requests_are_400_naming_the_parameter(live_api, body, param):
    response = post(live_api, {"messages": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_langchain_bind_tools_two_step_loop(live_api):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"Sunny and 21 degrees celsius in {city}."

    llm = ChatOpenAI(model=MODEL, base_url=live_api.base_url, api_key=live_api.keys["alice"], temperature=0,
                     max_tokens=60, max_retries=0, timeout=TIMEOUT, default_headers=NO_CACHE)
    messages = [HumanMessage("What is the weather like in Paris today?")]
    first = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    assert isinstance(first.tool_calls[0]["args"]["city"], str) and not first.invalid_tool_calls
    messages.append(first)
    for call in first.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    answer = llm.bind_tools([get_weather]).invoke(messages)
    assert not answer.tool_calls and answer.content.strip()


# --- The reader alone: the same calls whatever the pieces the text arrives in ----------------------

CALLS_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "n": [1, {"a": 2}]} }\n'
              '</tool_call>\n<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>')


@pytest.mark.parametrize("size", [1, 2, 5, 13, len(CALLS_TEXT)])
def test_reader_gives_the_same_calls_for_any_split(size):
    reader = ToolCallReader()
    deltas = []
    for start in range(0, len(CALLS_TEXT), size):
        deltas += reader.feed(CALLS_TEXT[start:start + size])
    deltas += reader.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reader.calls] == [
        ("get_weather", {"city": 'Pa"ris {x}', "n": [1, {"a": 2}]}), ("add", {"a": 1, "b": 2})]
    assert reader.content == "" and all("content" not in delta for delta in deltas)
    streamed = {}
    for delta in deltas:
        for call in delta["tool_calls"]:
            streamed[call["index"]] = streamed.get(call["index"], "") + call["function"]["arguments"]
    assert list(streamed.values()) == [c["function"]["arguments"] for c in reader.calls]


def test_reader_passes_plain_text_through():
    assert tool_reply("Hello <b>there</b>") == ("Hello <b>there</b>", [])
    assert tool_reply("<tool") == ("<tool", [])


def test_an_upstreams_tool_call_deltas_read_back_as_the_same_calls():
    upstream = [[{"index": 0, "id": "x1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
                [{"index": 0, "function": {"arguments": '{"city": "Pa'}}], [{"index": 0, "function": {"arguments": 'ris"}'}}],
                [{"index": 1, "id": "x2", "type": "function", "function": {"name": "now", "arguments": ""}}]]
    writer, reader = ToolCallText(offered("get_weather", "now")), ToolCallReader()
    for deltas in upstream:
        reader.feed(writer.feed(deltas))
    reader.feed(writer.close())
    reader.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reader.calls] == [
        ("get_weather", {"city": "Paris"}), ("now", {})]


def offered(*names: str, **body) -> dict:
    return {"tools": [{"type": "function", "function": {"name": name}} for name in names], **body}


def a_call(index: int, name) -> list[dict]:
    return [{"index": index, "id": f"x{index}", "type": "function", "function": {"name": name, "arguments": "{}"}}]


@pytest.mark.parametrize("body, calls", [
    (offered("get_weather"), [a_call(0, "rm_rf")]),  # never offered
    (offered("get_weather"), [a_call(0, "")]),  # no name
    (offered("get_weather"), [a_call(0, None)]),
    (offered("get_weather", "now", tool_choice={"type": "function", "function": {"name": "now"}}),
     [a_call(0, "get_weather")]),  # offered, but tool_choice named another
    (offered("get_weather", tool_choice="none"), [a_call(0, "get_weather")]),
    (offered("get_weather", "now", parallel_tool_calls=False), [a_call(0, "get_weather"), a_call(1, "now")]),
])
def test_an_upstreams_call_outside_what_the_request_offered_is_refused(body, calls):
    writer = ToolCallText(body)
    with pytest.raises(UnofferedToolCall):
        for deltas in calls:
            writer.feed(deltas)


def test_an_upstreams_offered_calls_pass():
    writer = ToolCallText(offered("get_weather", "now", tool_choice="auto"))
    assert "get_weather" in writer.feed(a_call(0, "get_weather")) and "now" in writer.feed(a_call(1, "now"))


TOOLS_TEMPLATE = (  # a ChatML template that lists tools itself, as Hermes-style templates do
    "{% if tools %}<|im_start|>system\nTools you may call:\n{% for tool in tools %}{{ tool.function.name }}: "
    "{{ tool.function.description }}\n{% endfor %}Call one as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call><|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_supports_tools_renders_them_and_the_grammar_still_holds(smollm2_path):
    from chat.engine import ModelRegistry, ModelSpec, SamplingParams
    from chat.tooling.grammar import tool_call_grammar
    from chat.tooling.requests import tool_request_from

    registry = ModelRegistry([ModelSpec(name="smol-tools", path=str(smollm2_path), chat_template=TOOLS_TEMPLATE,
                                        parallel=1, prefix_cache_mb=0)])
    try:
        engine = registry.get("smol-tools")
        request = tool_request_from(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
        assert engine.template_supports_tools
        prompt = engine.render_chat(QUESTION, tools=[tool.as_openai() for tool in request.callable_tools])
        assert "get_weather: The current weather in a city." in prompt and "add: Add two integers." in prompt
        assert "get_weather" not in engine.render_chat(QUESTION)  # no tools, no tool text
        completion = engine.generate(prompt, SamplingParams(max_tokens=60, temperature=0,
                                                            grammar=tool_call_grammar(request)))
        content, calls = tool_reply(completion.text)
        assert content is None and len(calls) == 1
        call = calls[0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    finally:
        registry.close()


def test_parameters_that_refer_to_their_own_defs_as_pydantic_writes_them(smollm2_path):
    """The parameters are placed inside the call's schema, so "#/$defs/..." must follow them there."""
    from chat.tooling.grammar import tool_call_grammar
    from chat.tooling.requests import tool_request_from
    from tests.chat.engine.gbnf_check import GbnfChecker

    order = {"type": "function", "function": {"name": "order", "parameters": {
        "type": "object", "$defs": {"Item": {"type": "object", "properties": {"sku": {"$ref": "#/$defs/Sku"}},
                                             "required": ["sku"]},
                                    "Sku": {"type": "string", "enum": ["A1", "B2"]}},
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2},
                       "note": {"const": {"$ref": "#/$defs/Sku"}}},  # data, not a reference: kept as written
        "required": ["items"]}}}
    checker = GbnfChecker(smollm2_path)
    try:
        for tools in ([order], [WEATHER, order]):
            request = tool_request_from(tools=tools, tool_choice="required", parallel_tool_calls=False)
            grammar = tool_call_grammar(request)
            call = '<tool_call>\n{"name":"order","arguments":{"items":[{"sku":"B2"}]}}\n</tool_call>'
            assert checker.accepts(grammar, call)
            assert not checker.accepts(grammar, call.replace("B2", "C3"))
            assert checker.accepts(grammar, call.replace("]}}", '],"note":{"$ref":"#/$defs/Sku"}}}'))
    finally:
        checker.close()

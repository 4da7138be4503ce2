"""A schema no reply can satisfy, or one the server cannot enforce, is a 400 naming the keyword, before generation."""

import pytest

from tests.factories import make_api_client

pytestmark = pytest.mark.django_db

URL = "/v1/chat/completions"
GRAMMAR_WORDS = ("root", "gbnf", "grammar", "rule")


@pytest.fixture
def client():
    return make_api_client("schemas", key_name="schemas")


def ask(client, schema=None, **extra):
    body = {"messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 8, **extra}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return client.post(URL, body, format="json", HTTP_CACHE_CONTROL="no-cache")


def assert_refused(response, *, param: str, keyword: str) -> dict:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert f"'{keyword}'" in error["message"]
    assert not any(word in error["message"].lower() for word in GRAMMAR_WORDS), error["message"]
    return error


@pytest.mark.parametrize(("schema", "keyword", "code"), [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum", "unsatisfiable_schema"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "minItems", "unsatisfiable_schema"),
    ({"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 1, "maximum": 1}},
      "required": ["n"]}, "exclusiveMinimum", "unsatisfiable_schema"),
    ({"enum": []}, "enum", "unsatisfiable_schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}, "required": ["a"]}, "$ref",
     "unsupported_schema"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf", "unsupported_schema"),
])
def test_response_format_schemas_that_cannot_be_honored_are_400(client, schema, keyword, code):
    error = assert_refused(ask(client, schema), param="response_format", keyword=keyword)
    assert error["code"] == code


def test_an_empty_enum_says_nothing_about_grammars(client):
    error = assert_refused(ask(client, {"enum": []}), param="response_format", keyword="enum")
    assert "enum" in error["message"] and "GBNF" not in error["message"]


def test_a_tool_whose_parameters_cannot_be_honored_is_400_naming_the_tool(client):
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "bad", "parameters": {
                 "type": "object", "properties": {"n": {"type": "integer", "minimum": 9, "maximum": 1}},
                 "required": ["n"]}}}]
    error = assert_refused(ask(client, tools=tools, tool_choice="required"),
                           param="tools[1].function.parameters", keyword="minimum")
    assert error["code"] == "unsatisfiable_schema"

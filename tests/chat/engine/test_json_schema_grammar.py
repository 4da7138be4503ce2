"""JSON Schema -> GBNF (chat/engine/json_schema/), checked with llama.cpp's own grammar sampler.

Each schema's grammar is fed to llama.cpp (SmolLM2's vocabulary, no weights): what it lets through
and what it stops. Refusals name the keyword and say nothing about grammars.
"""

import json
from pathlib import Path

import jsonschema
import pytest

from chat.engine.grammars import SchemaNotConvertible, json_object_grammar, json_schema_grammar

from .gbnf_check import GbnfChecker

pytestmark = pytest.mark.smollm2
FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "json_schemas.json").read_text())
GRAMMAR_WORDS = ("root", "gbnf", "grammar", "rule")


@pytest.fixture(scope="module")
def gbnf(smollm2_gguf):
    checker = GbnfChecker(smollm2_gguf)
    yield checker
    checker.close()


def test_an_integer_range_is_in_the_grammar(gbnf):
    grammar = json_schema_grammar({"type": "integer", "minimum": 1, "maximum": 10})
    assert [n for n in range(-20, 200) if gbnf.accepts(grammar, str(n))] == list(range(1, 11))
    assert not gbnf.accepts(grammar, "51236940")
    assert not gbnf.accepts(grammar, "05")


@pytest.mark.parametrize(("schema", "inside", "outside"), [
    ({"type": "integer", "minimum": -12, "maximum": 307}, ["-12", "0", "99", "307"], ["-13", "308", "1000", "-0"]),
    ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}, ["1", "99"], ["0", "100"]),
    ({"type": "integer", "minimum": 1000}, ["1000", "123456"], ["999", "-5"]),
    ({"type": "integer", "maximum": -3}, ["-3", "-400"], ["-2", "0", "7"]),
    ({"type": "integer", "minimum": 0.5, "maximum": 3.5}, ["1", "3"], ["0", "4"]),
])
def test_integer_bounds_of_every_kind(gbnf, schema, inside, outside):
    grammar = json_schema_grammar(schema)
    assert all(gbnf.accepts(grammar, text) for text in inside)
    assert not any(gbnf.accepts(grammar, text) for text in outside)


def test_a_number_with_exclusive_minimum_and_maximum(gbnf):
    grammar = json_schema_grammar({"type": "number", "exclusiveMinimum": 0, "maximum": 1})
    assert all(gbnf.accepts(grammar, text) for text in ["0.5", "1", "0.000001", "0.25"])
    assert not any(gbnf.accepts(grammar, text) for text in ["0", "0.0", "123", "1.5", "-0.5", "1.01", "2"])


def test_grammar_strings_cannot_hold_raw_control_characters(gbnf):
    for schema in ({"type": "string"}, {"type": "string", "maxLength": 20},
                   {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}):
        grammar = json_schema_grammar(schema)
        wrap = (lambda s: '{"note":' + s + "}") if schema["type"] == "object" else (lambda s: s)
        assert gbnf.accepts(grammar, wrap('"two\\nlines\\tand a \\u0001"'))
        for raw in "\n\t\r\x01\x1f\x7f":
            assert not gbnf.accepts(grammar, wrap(f'"two{raw}lines"')), repr(raw)
    assert not gbnf.accepts(json_object_grammar(), '{"a":"x\ny"}')


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum"),
    ({"type": "number", "exclusiveMinimum": 2, "maximum": 2}, "exclusiveMinimum"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ({"type": "string", "minLength": 4, "maxLength": 2}, "minLength"),
    ({"enum": []}, "enum"),
    ({"type": "string", "enum": [1, 2]}, "enum"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}, "$ref"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "maxProperties": 0},
     "maxProperties"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "type"),
    ({"type": "integer", "multipleOf": 7}, "multipleOf"),
    ({"type": "string", "not": {"pattern": "^a"}}, "not"),
    ({"allOf": [{"const": 1}, {"const": 2}]}, "const"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "pattern": "(?<=a)b"}, "pattern"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "oneOf"),
])
def test_schemas_that_cannot_be_honored_are_refused_naming_the_keyword(schema, keyword):
    with pytest.raises(SchemaNotConvertible) as raised:
        json_schema_grammar(schema)
    assert raised.value.keyword == keyword
    message = str(raised.value)
    assert f"'{keyword}'" in message
    assert not any(word in message.lower() for word in GRAMMAR_WORDS), message


@pytest.mark.parametrize("case", FIXTURES, ids=[case["name"] for case in FIXTURES])
def test_every_fixture_schema_compiles_to_a_grammar_llama_cpp_parses(gbnf, case):
    grammar = json_schema_grammar(case["schema"])
    assert gbnf.parses(grammar)


def test_the_grammar_writes_compact_json(gbnf):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {}}},
              "required": ["a", "b"]}
    grammar = json_schema_grammar(schema)
    assert gbnf.accepts(grammar, '{"a":1,"b":[true,null,{"x":"y"}]}')
    assert not gbnf.accepts(grammar, '{"a": 1, "b": []}')
    assert not gbnf.accepts(grammar, '{\n  "a":1,"b":[]}')


def test_what_the_grammar_accepts_validates(gbnf):
    """Texts the grammar lets through validate; texts it stops are invalid (formats, patterns, enums, $ref)."""
    cases = [
        ({"type": "string", "format": "date"}, ['"2024-02-28"', '"1999-12-31"'], ['"2024-02-30"', '"2024-13-01"']),
        ({"type": "string", "format": "date-time"}, ['"2024-01-01T12:00:00Z"'], ['"2024-01-01 12:00:00"']),
        ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']),
        ({"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, ['"AB-123"'], ['"AB-12"', '"ab-123"']),
        ({"type": "string", "pattern": "[0-9]+", "minLength": 5, "maxLength": 8}, ['"12345"', '"12345678"'],
         ['"1234"', '"123456789"']),
        ({"enum": ["a", 1, None]}, ['"a"', "1", "null"], ['"b"', "2"]),
        ({"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                                           "next": {"$ref": "#/$defs/n"}}, "required": ["v"]}},
          "$ref": "#/$defs/n"}, ['{"v":1}', '{"v":1,"next":{"v":2,"next":{"v":3}}}'], ['{"v":10}', '{"next":{"v":1}}']),
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["b"]},
         ['{"b":"x"}', '{"a":1,"b":"x"}'], ["{}", '{"a":1}', '{"b":"x",}']),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, ["[1,2]", "[1,2,3]"],
         ["[1]", "[1,2,3,4]"]),
    ]
    for schema, good, bad in cases:
        checker = jsonschema.validators.validator_for(schema).FORMAT_CHECKER
        grammar = json_schema_grammar(schema)
        for text in good:
            assert gbnf.accepts(grammar, text), (schema, text)
            jsonschema.validate(json.loads(text), schema, format_checker=checker)
        for text in bad:
            assert not gbnf.accepts(grammar, text), (schema, text)


ONE_OF_CASES = [
    # like JSONSchemaBench's calculate_area (Glaiveai2K): every object of the 2nd and 3rd branches also
    # matches the first (it requires nothing and allows more), so only the first may be written
    ({"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object", "oneOf": [
        {"properties": {"radius": {"type": "number"}}},
        {"properties": {"length": {"type": "number"}, "width": {"type": "number"}}, "required": ["length"]},
        {"properties": {"base": {"type": "number"}, "height": {"type": "number"}}, "required": ["base", "height"]},
    ]}}, "required": ["shape", "dimensions"]},
     ['{"shape":"c","dimensions":{}}', '{"shape":"c","dimensions":{"radius":1}}'],
     ['{"shape":"c","dimensions":{"length":2}}', '{"shape":"t","dimensions":{"base":1,"height":2}}']),
    # a discriminator: a property whose const differs
    ({"oneOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                 "required": ["kind"]},
                {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
                 "required": ["kind"]}]},
     ['{"kind":"circle","r":1}', '{"kind":"square"}', '{"kind":"square","side":2}'], ['{}', '{"r":1}']),
    # overlapping enums: the shared value is written by neither branch
    ({"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}, ['"a"', '"c"'], ['"b"']),
    # different types
    ({"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}, ['"x"', "3", "null"], ["true"]),
    # ranges that cannot meet: lengths, numbers
    ({"type": "string", "oneOf": [{"maxLength": 0}, {"minLength": 1, "maxLength": 3}]}, ['""', '"abc"'], ['"abcd"']),
    ({"oneOf": [{"type": "integer", "maximum": 0}, {"type": "number", "exclusiveMinimum": 0}]},
     ["0", "-4", "0.5", "7"], []),
    # a discriminator that comes from merging the branch into the object around it (allOf)
    ({"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square"]},
                                       "r": {"type": "number"}, "side": {"type": "number"}},
      "required": ["shape"],
      "oneOf": [{"properties": {"shape": {"const": "circle"}}}, {"properties": {"shape": {"const": "square"}}}]},
     ['{"shape":"circle","r":1}', '{"shape":"square"}'], ['{"shape":"triangle"}']),
    # a branch that does not allow what the other requires
    ({"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     ['{"b":1}', '{}', '{"a":1}'], ['{"a":"x"}', '{"b":"x"}']),
]


@pytest.mark.parametrize(("schema", "good", "bad"), ONE_OF_CASES)
def test_one_of_writes_no_value_that_matches_two_branches(gbnf, schema, good, bad):
    grammar = json_schema_grammar(schema)
    for text in good:
        assert gbnf.accepts(grammar, text), text
        jsonschema.validate(json.loads(text), schema)
    for text in bad:
        assert not gbnf.accepts(grammar, text), text


@pytest.mark.parametrize("pattern", [r"^((a?){0,12}){0,12}$", r"^(a*)*$", r"^(a|)+$", r"^(a?b?){3}$"])
def test_a_repetition_of_what_can_match_nothing_is_refused(pattern):
    """Nested, each empty turn is another path that llama.cpp's grammar sampler follows: ((a?){0,12}){0,12} took
    2.7 s per token on the scheduler's thread, and every tenant's streams waited."""
    with pytest.raises(SchemaNotConvertible) as raised:
        json_schema_grammar({"type": "string", "pattern": pattern})
    assert raised.value.keyword == "pattern" and "can match nothing" in str(raised.value)


@pytest.mark.parametrize("pattern", [r"^(a+)+$", r"^[a-z]+(-[a-z]+)*$", r"^(\w+\s?)+$", r"^(ab?)?$"])
def test_repetitions_of_what_always_matches_something_are_kept(pattern):
    json_schema_grammar({"type": "string", "pattern": pattern})


def test_the_schemas_own_regexes_run_in_a_time_budget(monkeypatch):
    """Python's re backtracks exponentially on ^(a+)+$ against 'aaa...!' and holds the GIL: the whole process
    stopped while an enum value or a property name was checked against a client's pattern."""
    from chat.engine.json_schema import converter

    evil = {"type": "string", "pattern": "^(a+)+$", "enum": ["a" * 40 + "!", "aaa"]}
    assert '\\"aaa\\"' in json_schema_grammar(evil)  # the regex module, not re: answered at once
    monkeypatch.setattr(converter, "REGEX_SECONDS", 0.0)  # the budget spent: refused, not run
    for schema, keyword in ((evil, "pattern"),
                            ({"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}},
                              "properties": {"aaa": {"type": "string"}}}, "patternProperties")):
        with pytest.raises(SchemaNotConvertible) as raised:
            json_schema_grammar(schema)
        assert raised.value.keyword == keyword and "take too long" in str(raised.value)


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 10 ** 400}, {"type": "string", "format": ["date"]},
    {"not": {"type": [{"a": 1}]}}, {"if": {"enum": -1}}, {"if": {"type": "string"}, "anyOf": 0},
    {"dependentRequired": {"a": ["b"]}, "required": 5}, {"allOf": [{"type": {"a": 1}}, {"type": "string"}]},
    {"minProperties": None, "type": "object"}, {"const": {"a": 1}, "type": {"a": 1}},
    {"type": "object", "required": [{"a": 1}]},
])
def test_a_keyword_with_a_value_of_the_wrong_type_is_refused_not_a_crash(schema):
    with pytest.raises(SchemaNotConvertible) as raised:
        json_schema_grammar(schema)
    assert "wrong type" in str(raised.value)


def test_an_enum_of_thousands_of_values_is_refused():
    """Each value is an open alternative of the grammar while the reply is written: 60,000 of them held the
    scheduler's thread (every stream) for seconds per filtered token."""
    from chat.engine.json_schema.converter import MAX_ENUM_VALUES

    json_schema_grammar({"enum": [f"{n:05}" for n in range(MAX_ENUM_VALUES)]})
    with pytest.raises(SchemaNotConvertible) as raised:
        json_schema_grammar({"enum": [f"{n:05}" for n in range(60_000)]})
    assert raised.value.keyword == "enum" and "60,000 values" in str(raised.value)


def test_a_class_of_characters_past_latin_1_is_written_as_such(gbnf):
    """U+2028 and U+2029 are escaped in classes; "\\x2028" read as "\\x20" then "28" let a space or a digit through."""
    grammar = json_schema_grammar({"type": "string", "pattern": "^[\u2028-\u2030]$"})
    assert gbnf.accepts(grammar, json.dumps("\u2029", ensure_ascii=False))
    assert not any(gbnf.accepts(grammar, json.dumps(text)) for text in ("9", "2", " ", "8"))

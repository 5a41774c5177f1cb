"""Client JSON Schemas: what llama-server's grammar enforces is accepted, what it would drop
is a 400 naming the place and the keyword, and nothing can reach its converter unbounded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casedesk.anthropic.errors import ApiError
from casedesk.anthropic.json_schema import (
    MAX_JSON_DEPTH,
    MAX_SCHEMA_NODES,
    check_grammar_schema,
    check_json_depth,
    check_schema_bounds,
)
from casedesk.anthropic.schema import parse_messages_request, request_json
from casedesk.translate.request import to_chat_request

USER = [{"role": "user", "content": "hi"}]

# What `client.messages.parse(output_format=Model)` sends (anthropic 2.15's transform_schema).
WEATHER = {
    "type": "object",
    "title": "Weather",
    "properties": {
        "city": {"type": "string", "title": "City"},
        "celsius": {"type": "number", "title": "Celsius"},
        "sky": {"enum": ["clear", "cloudy", "rain"], "title": "Sky"},
    },
    "additionalProperties": False,
    "required": ["city", "celsius", "sky"],
}
ORDER = {
    "$defs": {
        "Item": {
            "type": "object",
            "title": "Item",
            "properties": {"name": {"type": "string", "title": "Name"}, "qty": {"type": "integer", "title": "Qty"}},
            "additionalProperties": False,
            "required": ["name", "qty"],
        }
    },
    "type": "object",
    "title": "Order",
    "properties": {
        "customer": {"type": "string", "title": "Customer"},
        "items": {"type": "array", "title": "Items", "items": {"$ref": "#/$defs/Item"}},
    },
    "additionalProperties": False,
    "required": ["customer", "items"],
}
RATING = {
    "type": "object",
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "when": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "kind": {"const": "rating"},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
        "either": {"type": ["integer", "null"]},
        "free": {},
        "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["stars", "mood"],
}


def refused(schema: Any) -> str:
    with pytest.raises(ApiError) as caught:
        check_schema_bounds(schema, "s")
        check_grammar_schema(schema, "s")
    assert caught.value.status == 400
    return caught.value.message


@pytest.mark.parametrize("schema", [WEATHER, ORDER, RATING, {}, {"type": "object"}, {"type": "string"}])
def test_schemas_the_grammar_enforces_are_accepted(schema: dict[str, Any]) -> None:
    check_schema_bounds(schema, "s")
    check_grammar_schema(schema, "s")


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "number", "minimum": 0}, "s: minimum for type number"),
        ({"type": "integer", "minimum": 1.5}, "s.minimum"),
        ({"type": "integer", "multipleOf": 2}, "s: multipleOf"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "s: uniqueItems"),
        ({"type": "array", "items": {}, "contains": {"const": 1}}, "s: contains"),
        ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "s: minProperties"),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "s.properties.a: not"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "s: patternProperties"),
        ({"type": "string", "format": "email"}, "s.format: 'email'"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "s: maxLength beside pattern"),
        ({"type": "string", "pattern": "a+"}, "s.pattern: the grammar needs a pattern anchored"),
        ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}}, "s: maxLength beside $ref"),
        ({"anyOf": [{"type": "string"}], "minLength": 1}, "s: minLength beside anyOf"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "s: if, then in a schema without a type"),
        ({"enum": [1, 2], "minimum": 1}, "s: minimum beside enum"),
        ({"type": "widget"}, "s.type: unknown type 'widget'"),
        ({"allOf": [{"type": "string"}]}, "s.allOf.0: allOf merges only"),
        ({"type": "array", "items": {}, "prefixItems": [{}]}, "s: items beside prefixItems"),
        ({"properties": {"a": {"type": "number", "exclusiveMaximum": 3}}}, "s.properties.a: exclusiveMaximum"),
        ({"$defs": {"x": {"type": "number", "maximum": 1}}, "type": "object"}, "s.$defs.x: maximum"),
    ],
)
def test_constraints_the_grammar_would_drop_are_refused_by_name(schema: dict[str, Any], named: str) -> None:
    assert named in refused(schema)


def test_bounds_keep_the_converter_safe() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "nested more than 32" in refused(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_NODES)}}
    assert f"more than {MAX_SCHEMA_NODES} subschemas" in refused(wide)
    assert "s.pattern: must be a string of at most 1000" in refused(
        {"type": "string", "pattern": "^" + "a" * 2000 + "$"}
    )
    assert "s.maxItems" in refused({"type": "array", "items": {}, "maxItems": 10**9})
    assert "s.maxLength" in refused({"type": "string", "maxLength": -1})
    assert "only local references" in refused({"$ref": "https://example.invalid/schema.json"})
    assert "does not resolve" in refused({"$ref": "#/$defs/missing"})


def test_recursive_refs_are_refused() -> None:
    assert "recursive schema" in refused({"$ref": "#"})
    tree = {
        "$defs": {
            "node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "$ref": "#/$defs/node",
    }
    assert "recursive schema ('#/$defs/node'" in refused(tree)
    mutual = {
        "$defs": {"a": {"properties": {"b": {"$ref": "#/$defs/b"}}}, "b": {"properties": {"a": {"$ref": "#/$defs/a"}}}},
        "properties": {"x": {"$ref": "#/$defs/a"}},
    }
    assert "recursive schema" in refused(mutual)


def test_json_depth_is_bounded_without_recursion() -> None:
    value: Any = 1
    for _ in range(MAX_JSON_DEPTH):
        value = [value]
    check_json_depth(value, "v")
    with pytest.raises(ApiError, match="v: JSON nested more than 128"):
        check_json_depth([value], "v")


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": USER, **fields}


def test_output_config_and_output_format_become_a_response_format() -> None:
    for key, value in (
        ("output_config", {"format": {"type": "json_schema", "schema": WEATHER}}),
        ("output_format", {"type": "json_schema", "schema": WEATHER}),
    ):
        chat = to_chat_request(parse_messages_request(body(**{key: value})), stream=False)
        assert chat["response_format"] == {"type": "json_schema", "json_schema": {"schema": WEATHER}}


def test_a_schema_answer_may_not_spend_its_tokens_on_newlines() -> None:
    schema = {"output_config": {"format": {"type": "json_schema", "schema": WEATHER}}}
    chat = to_chat_request(parse_messages_request(body(**schema)), stream=False)
    assert chat["logit_bias"] == [["\n", False], ["\n\n", False]]
    # Thinking comes before the JSON, in prose: its newlines stay.
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert "logit_bias" not in to_chat_request(parse_messages_request(body(**schema, **thinking)), stream=False)
    # An answer without a schema is prose too.
    assert "logit_bias" not in to_chat_request(parse_messages_request(body()), stream=False)


def test_output_format_errors_name_the_field() -> None:
    cases = [
        (body(output_config={"format": {"type": "json_object"}}), "output_config.format.type"),
        (body(output_config={"format": {"type": "json_schema"}}), "output_config.format.schema"),
        (
            body(output_config={"format": {"type": "json_schema", "schema": {"type": "number", "maximum": 3}}}),
            "output_config.format.schema: maximum",
        ),
        (body(output_format={"type": "json_schema", "schema": {"$ref": "#"}}), "output_format.schema.$ref"),
        (
            body(
                output_config={"format": {"type": "json_schema", "schema": {}}},
                output_format={"type": "json_schema", "schema": {}},
            ),
            "not both",
        ),
        (body(output_config={"effort": "extreme"}), "output_config.effort"),
        (body(output_config=[]), "output_config"),
    ]
    for payload, named in cases:
        with pytest.raises(ApiError) as caught:
            parse_messages_request(payload)
        assert caught.value.status == 400 and named in caught.value.message, caught.value.message


def test_tool_schemas_are_bounded_and_strict_ones_checked_naming_the_tool() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ApiError, match=r"tools.1.input_schema \(tool 'deep'\)"):
        parse_messages_request(body(tools=[{"name": "ok", "input_schema": {}}, {"name": "deep", "input_schema": deep}]))
    loose = {"type": "object", "properties": {"n": {"type": "number", "minimum": 0}}}
    parse_messages_request(body(tools=[{"name": "t", "input_schema": loose}]))  # not strict: as given
    with pytest.raises(ApiError, match=r"tools.0.input_schema \(tool 't'\).properties.n: minimum"):
        parse_messages_request(body(tools=[{"name": "t", "input_schema": loose, "strict": True}]))
    with pytest.raises(ApiError, match="tools.0.strict"):
        parse_messages_request(body(tools=[{"name": "t", "input_schema": {}, "strict": "yes"}]))


def test_json_nested_deeper_than_orjson_encodes_is_a_400_naming_the_field() -> None:
    headers = {"anthropic-version": "2023-06-01"}
    tool_use = (
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":'
        b'[{"type":"tool_use","id":"i","name":"t","input":' + nested(300) + b"}]}]}"
    )
    with pytest.raises(ApiError, match=r"messages.1.content.0.input: JSON nested more than 128"):
        parse_messages_request(request_json(headers, tool_use))
    schema = (
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"name":"t","input_schema":{"default":'
        + nested(300)
        + b"}}]}"
    )
    with pytest.raises(ApiError, match=r"tools.0.input_schema \(tool 't'\): JSON nested more than 128"):
        parse_messages_request(request_json(headers, schema))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
KEYWORDS = [
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "$ref",
    "$defs",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxItems",
    "uniqueItems",
    "title",
]
type_names = st.sampled_from(["string", "number", "integer", "boolean", "null", "object", "array", "x"])
schemas = st.recursive(
    st.dictionaries(st.sampled_from(KEYWORDS), json_values | type_names, max_size=3),
    lambda children: st.fixed_dictionaries(
        {},
        optional={
            "type": type_names | st.lists(type_names, max_size=2),
            "properties": st.dictionaries(st.text(max_size=4), children, max_size=3),
            "items": children,
            "anyOf": st.lists(children, max_size=3),
            "allOf": st.lists(children, max_size=2),
            "$defs": st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2),
            "$ref": st.sampled_from(["#", "#/$defs/a", "#/$defs/b", "#/properties/x", "http://x"]),
            "minimum": st.integers(-3, 3) | st.floats(allow_nan=False),
            "pattern": st.sampled_from(["^a$", "a", ""]),
            "format": st.sampled_from(["date", "email"]),
        },
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(schemas)
def test_any_schema_either_maps_or_is_a_400(schema: dict[str, Any]) -> None:
    payload = body(output_config={"format": {"type": "json_schema", "schema": schema}})
    try:
        request = parse_messages_request(payload)
    except ApiError as error:
        assert error.status == 400 and error.message.startswith("output_config.format")
        return
    chat = to_chat_request(request, stream=True)
    assert chat["response_format"]["json_schema"]["schema"] == schema
    orjson.dumps(chat)


def test_a_tool_that_is_not_strict_loses_only_its_over_long_bounds() -> None:
    """Claude Code's own tools carry maxLength in the tens of thousands: a tool whose input is not
    promised to validate is answered with those bounds dropped; a strict one is refused."""
    schema = {
        "type": "object",
        "properties": {
            "script": {"type": "string", "maxLength": 50_000},
            "name": {"type": "string", "maxLength": 20},
            "maxLength": {"type": "integer"},  # a property named like the keyword stays
        },
    }
    tool = {"name": "Workflow", "input_schema": schema}
    chat = to_chat_request(parse_messages_request(body(tools=[tool])), stream=False)
    forwarded = chat["tools"][0]["function"]["parameters"]["properties"]
    assert "maxLength" not in forwarded["script"]
    assert forwarded["name"]["maxLength"] == 20 and forwarded["maxLength"] == {"type": "integer"}
    with pytest.raises(ApiError) as caught:
        parse_messages_request(body(tools=[{**tool, "strict": True}]))
    assert caught.value.status == 400 and "script.maxLength" in caught.value.message

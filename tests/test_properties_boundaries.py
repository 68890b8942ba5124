"""Property tests of two boundaries the model and the network control: tool-argument
validation (`tools.base.validate_arguments`) and the fake provider's request parsing
(through its ASGI app, in process). Bad input is a typed error (`InvalidToolArguments`)
or a 4xx JSON error, never a crash.

Two of them are crashes the property tests found (a schema `$ref` to nowhere or to
itself, an argument too large for `multipleOf`; directive arguments nested too deeply
for the JSON decoder), kept as cases.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from swarm_workers.errors import InvalidToolArguments
from swarm_workers.fakes.llm_server import FakeLLMConfig, build_app
from swarm_workers.tools.base import validate_arguments

PROPERTY = settings(max_examples=150, deadline=None)

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
leaf_schemas = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "array", "object"])},
        optional={
            "minimum": st.integers(-5, 5),
            "maxLength": st.integers(0, 5),
            "pattern": st.sampled_from(["^a", "[0-9]+", "(", "x{2,}"]),
            "enum": st.lists(json_values, max_size=3),
            "multipleOf": st.sampled_from([1, 2, 0.5]),
            "items": st.just({"type": "integer"}),
        },
    ),
    st.sampled_from([{}, {"type": "nonsense"}, {"minimum": "x"}, {"required": "a"}]),
)
schemas = st.builds(
    lambda props, required, extra: {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": extra,
    },
    st.dictionaries(st.sampled_from(["a", "b", "c"]), leaf_schemas, max_size=3),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
    st.booleans(),
)


@PROPERTY
@given(
    schema=schemas, arguments=st.dictionaries(st.sampled_from(["a", "b", "c", "z"]), json_values)
)
def test_tool_arguments_are_valid_or_invalid_tool_arguments(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    with contextlib.suppress(InvalidToolArguments):
        validate_arguments("srv__tool", schema, arguments)


@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        ({"$ref": "#/$defs/missing"}, {}),  # _WrappedReferencingError (PointerToNowhere)
        ({"$ref": "#"}, {}),  # RecursionError
        ({"type": "object", "properties": {"n": {"multipleOf": 0.5}}}, {"n": 10**400}),  # Overflow
    ],
)
def test_tool_schemas_that_crash_validate_arguments(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    with pytest.raises(InvalidToolArguments):
        validate_arguments("srv__tool", schema, arguments)


@pytest.fixture(scope="module")
def provider() -> TestClient:
    return TestClient(build_app(FakeLLMConfig()), raise_server_exceptions=False)


def _check(response: Any) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body["error"]["message"], str)
    else:
        assert body["choices"][0]["message"]["role"] == "assistant"


roles = st.sampled_from(["system", "user", "assistant", "tool", "robot"])
contents = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["CALL t", 'CALL t {"a": 1}', "CALL_BAD t {}", "REPLY_LEN 5", "CALL t {"]),
    json_values,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.text(max_size=8), json_values),
        "messages": st.one_of(
            json_values,
            st.lists(
                st.fixed_dictionaries(
                    {"role": roles, "content": contents},
                    optional={"tool_call_id": st.text(max_size=4), "tool_calls": json_values},
                ),
                max_size=4,
            ),
        ),
        "tools": st.one_of(json_values, st.just([{"type": "function", "function": {"name": "t"}}])),
        "max_tokens": json_values,
        "tool_choice": json_values,
        "stream": json_values,
    },
)


@PROPERTY
@given(body=st.one_of(requests.map(json.dumps).map(str.encode), st.binary(max_size=40)))
def test_the_fake_provider_answers_any_request_with_a_reply_or_a_4xx_json_error(
    provider: TestClient, body: bytes
) -> None:
    _check(provider.post("/v1/chat/completions", content=body))


def test_deeply_nested_directive_arguments_crash_the_fake_provider(provider: TestClient) -> None:
    content = 'CALL t {"a": ' + "[" * 100_000  # json.JSONDecoder recurses per level
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "tools": [{"type": "function", "function": {"name": "t"}}],
    }
    _check(provider.post("/v1/chat/completions", json=body))

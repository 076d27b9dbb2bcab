"""Grammars for response_format and forced tool calls (llguidance, real Qwen vocabulary)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from qwen3_mlx.server.constrain import GrammarFactory

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}


@pytest.fixture(scope="module")
def factory(qwen3_tokenizer):
    return GrammarFactory(qwen3_tokenizer, 151936, [151645, 151643])


def accepts(constraint, tokens) -> bool:
    return all(constraint.consume(t) for t in tokens)


def test_json_schema_grammar(factory, qwen3_tokenizer):
    encode = qwen3_tokenizer.encode
    for text in (
        '{"name": "Ada", "age": 36}',
        '{"name":"Ada","age":36}',
        '\n\n{\n  "name": "Ada",\n  "age": 36\n}',
    ):
        c = factory.json(SCHEMA, "response_format")
        assert accepts(c, encode(text)), text
        allowed = c.allowed()
        assert allowed[151645] and allowed.sum() <= 2  # complete: only end-of-turn remains
    for text in (
        '{"name": "Ada"}',
        '{"name": "Ada", "age": "36"}',
        '{"name": "Ada", "age": 36, "x": 1}',
        "Sure!",
    ):
        c = factory.json(SCHEMA, "response_format")
        ok = accepts(c, encode(text))
        assert not (ok and c.allowed()[151645]), text
    # Runs of whitespace inside the JSON are bounded (a weak model could fill them forever).
    assert not accepts(factory.json(SCHEMA, "x"), encode('{     "name"'))


def test_tool_call_grammar_and_mask(factory, qwen3_tokenizer):
    c = factory.tool_calls([WEATHER], parallel=False, where="tool_choice")
    logits = mx.zeros((1, 151936))
    masked = c.apply(logits, also_allow=(151667,))
    allowed = set(c.allowed().nonzero()[0].tolist())
    assert (
        151657 in allowed and 151667 not in allowed
    )  # <tool_call> may start; <think> only if asked
    assert mx.isfinite(masked[0, 151667]).item() and mx.isfinite(masked[0, 151657]).item()
    assert not mx.isfinite(masked[0, qwen3_tokenizer.encode("Hello")[0]]).item()
    assert mx.isfinite(masked[0]).sum().item() == len(allowed) + 1
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    assert accepts(c, qwen3_tokenizer.encode(call))
    assert c.allowed()[151645]
    wrong = factory.tool_calls([WEATHER], parallel=False, where="tool_choice")
    assert not accepts(
        wrong, qwen3_tokenizer.encode('<tool_call>\n{"name": "get_time", "arguments": {}}')
    )


def test_bad_schema_is_a_user_error(factory):
    from qwen3_mlx.errors import GenerationError

    with pytest.raises(GenerationError, match="response_format"):
        factory.json(
            {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "response_format"
        )


def test_a_constraint_rebuilt_from_its_spec_tracks_the_same_state(factory, qwen3_tokenizer):
    """`--parallel` followers rebuild rank 0's constraints from `spec` (plain data) and feed them
    rank 0's tokens without computing masks; they must fail or complete exactly as rank 0's."""
    import pickle

    original = factory.tool_calls([WEATHER], parallel=False, where="tool_choice")
    copy = factory.rebuild(pickle.loads(pickle.dumps(original.spec)))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    for token in qwen3_tokenizer.encode(call):
        assert original.allowed()[token]
        assert original.consume(token) and copy.consume(token)
    assert (copy.allowed() == original.allowed()).all() and copy.allowed()[151645]
    bad = factory.rebuild(original.spec)
    assert not bad.consume(qwen3_tokenizer.encode("Hello")[0]) and bad.failed

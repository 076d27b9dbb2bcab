"""Output parsing: reasoning / answer / tool calls in every thinking mode, and the same
result however the text is split into deltas."""

from __future__ import annotations

import json
import random

import pytest

from qwen3_mlx.parsing import Delta, OutputParser, parse_output


def _run(pieces, **kwargs):
    """Feed pieces; return (reasoning, content, [(index, name, arguments)], deltas)."""
    parser = OutputParser(**kwargs)
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [(d.index, d.name, d.arguments_delta) for d in deltas if d.kind == "tool_call"]
    return reasoning, content, calls, deltas


def _result(text, **kwargs):
    return _run([text], **kwargs)[:3]


def _assert_split_invariant(text, **kwargs):
    """Every 2-way split, every 3-way split (of short texts), and char by char give the
    one-shot result, so no tag is missed or leaked whatever the delta boundaries."""
    expected = _result(text, **kwargs)
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1) if n <= 80 else (i,):
            got = _run([text[:i], text[i:j], text[j:]], **kwargs)[:3]
            assert got == expected, (text, i, j)
    assert _run(list(text), **kwargs)[:3] == expected
    return expected


THINKING = "<think>\nThe user greets me.\nBe brief.\n</think>\n\nHello! How can I help?"
NO_THINK = "<think>\n\n</think>\n\nHello!"
TOOLS = (
    "<think>\nNeed weather and time.\n</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def test_thinking_on():
    assert _assert_split_invariant(THINKING) == (
        "The user greets me.\nBe brief.",
        "Hello! How can I help?",
        [],
    )


def test_no_think_empty_block():
    assert _assert_split_invariant(NO_THINK) == ("", "Hello!", [])


def test_thinking_off_plain_answer():
    assert _assert_split_invariant("The answer is 4.") == ("", "The answer is 4.", [])
    assert _result("\n\nLeading newlines go.") == ("", "Leading newlines go.", [])


def test_prompt_already_inside_think():
    text = "Reasoning from the prompt's open block.\n</think>\n\nAnswer."
    assert _assert_split_invariant(text, in_reasoning=True) == (
        "Reasoning from the prompt's open block.",
        "Answer.",
        [],
    )
    # A redundant <think> from the model is not part of the reasoning.
    assert _result("<think>\nr\n</think>\n\na", in_reasoning=True) == ("r", "a", [])


def test_think_never_closed_is_all_reasoning():
    assert _assert_split_invariant("<think>\nStill thinking when the budget ran out") == (
        "Still thinking when the budget ran out",
        "",
        [],
    )
    assert _result("cut short\n", in_reasoning=True) == ("cut short", "", [])


def test_tool_calls_multiple():
    reasoning, content, calls = _assert_split_invariant(TOOLS)
    assert reasoning == "Need weather and time."
    assert content == "Let me check."
    assert calls == [(0, "get_weather", '{"city": "Paris"}'), (1, "get_time", "{}")]


def test_tool_call_single_with_ids():
    text = '<tool_call>\n{"name": "f", "arguments": {"q": "é"}}\n</tool_call>'
    *_, deltas = _run([text])
    (delta,) = deltas
    assert delta.kind == "tool_call" and delta.index == 0 and delta.name == "f"
    assert delta.id.startswith("call_") and len(delta.id) == 29
    assert json.loads(delta.arguments_delta) == {"q": "é"}
    parsed = parse_output(text)
    assert parsed.content == "" and parsed.tool_calls[0].parsed_arguments() == {"q": "é"}
    assert parsed.tool_calls[0].id[5:].isalnum()


def test_tool_call_ids_are_unique():
    ids = {c.id for c in parse_output(TOOLS).tool_calls}
    assert len(ids) == 2


def test_tool_call_arguments_as_json_string():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert _result(text)[2] == [(0, "f", '{"a": 1}')]


@pytest.mark.parametrize(
    "body",
    [
        '{"name": broken}',  # not JSON
        '{"arguments": {}}',  # no name
        '["f", {}]',  # not an object
        '{"name": "f", "arguments": [1]}',  # arguments not an object
        '{"name": "f", "arguments": "not json"}',
    ],
)
def test_malformed_tool_call_is_content_verbatim(body):
    text = f"Trying.\n<tool_call>\n{body}\n</tool_call>\nDone."
    assert _assert_split_invariant(text) == ("", text, [])


def test_unclosed_tool_call():
    # Valid JSON without the closing tag (cut by a stop string) is still a call...
    assert _result('<tool_call>\n{"name": "f", "arguments": {}}\n') == ("", "", [(0, "f", "{}")])
    # ...a truncated body is kept as text.
    assert _result('<tool_call>\n{"name": "f", "argu') == (
        "",
        '<tool_call>\n{"name": "f", "argu',
        [],
    )


def test_parse_tools_off_keeps_tool_call_text():
    text = TOOLS.split("</think>\n\n")[1]
    assert _assert_split_invariant(TOOLS, parse_tools=False) == ("Need weather and time.", text, [])


def test_partial_tags_that_never_complete_are_text():
    text = "a </thi b <tool_ c </tool_call> d <think"
    assert _assert_split_invariant(text) == ("", text, [])
    assert _assert_split_invariant("r </thin", in_reasoning=True) == ("r </thin", "", [])


def test_partial_tags_are_held_back():
    parser = OutputParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>\nOK") == [Delta("reasoning", "OK")]
    assert parser.feed("\n</th") == []
    assert parser.feed("ink>\n\nHi <tool") == [Delta("content", "Hi")]
    assert parser.feed("s>") == [Delta("content", " <tools>")]
    assert parser.finish() == []


def test_think_only_at_start():
    # A <think> after the answer began is just text.
    assert _result("Answer <think>x</think>") == ("", "Answer <think>x</think>", [])
    # Content after a tool call keeps flowing, minus the newlines around the call.
    text = 'A\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nB'
    assert _result(text) == ("", "AB", [(0, "f", "{}")])


def test_state_reports_where_text_goes():
    parser = OutputParser()
    assert parser.state == "start" and not parser.in_reasoning
    parser.feed("<think>\nx")
    assert parser.in_reasoning
    parser.feed("</think>\n\ny<tool_call>")
    assert parser.state == "tool_call"
    assert OutputParser(in_reasoning=True).in_reasoning


def test_random_splits_of_mixed_outputs():
    rng = random.Random(0)
    texts = [THINKING, NO_THINK, TOOLS, "plain 你好 😀\n", '<tool_call>{"x"</tool_call>']
    for text in texts:
        for kwargs in ({}, {"in_reasoning": True}, {"parse_tools": False}):
            expected = _result(text, **kwargs)
            for _ in range(30):
                cuts = sorted(rng.sample(range(len(text) + 1), k=min(6, len(text))))
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
                assert _run(pieces, **kwargs)[:3] == expected


def test_parse_output_matches_streaming():
    parsed = parse_output(TOOLS)
    reasoning, content, calls = _result(TOOLS)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(n, a) for _, n, a in calls]

"""Prompt rendering: hand-written expected bytes for Qwen3's chat format, the jinja path,
and the thinking switches."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from qwen3_mlx.errors import TemplateError
from qwen3_mlx.template import generation_prompt_state, render_chat, thinking_enabled

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {}}}


def test_plain_chat():
    prompt = render_chat([{"role": "user", "content": "Hello!"}])
    assert prompt == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ]
    assert render_chat(messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_thinking_off_prefills_empty_think_block():
    prompt = render_chat([{"role": "user", "content": "2+2?"}], enable_thinking=False)
    assert prompt == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_no_generation_prompt():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    # The final assistant message is "after the last query", so it gets a think block.
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nb<|im_end|>\n"
    )


def test_multi_turn_drops_earlier_reasoning():
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Add again."},
        {"role": "user", "content": "Thanks /no_think"},
    ]
    assert render_chat(messages) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\nThanks /no_think<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tools_tool_calls_and_two_tool_responses():
    messages = [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "\nI need two tools.\n",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                # Arguments as a JSON string (OpenAI's wire format) are inserted verbatim.
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]
    expected = (
        "<|im_start|>system\nBe helpful.\n\n"
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        '{"type": "function", "function": {"name": "get_time", "parameters": {}}}\n'
        "</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        "<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and the time?<|im_end|>\n"
        # After the last query, so this step keeps its reasoning.
        "<|im_start|>assistant\n<think>\nI need two tools.\n</think>\n\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n"
        '<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>\n'
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(messages, tools=[WEATHER_TOOL, TIME_TOOL]) == expected


def test_tools_without_system_and_call_without_content():
    messages = [
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"name": "get_time", "arguments": {}}],
        },
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks"},
    ]
    prompt = render_chat(messages, tools=[TIME_TOOL], add_generation_prompt=False)
    assert prompt.startswith("<|im_start|>system\n# Tools\n\n")
    assert prompt.endswith(
        "<|im_start|>user\nTime?<|im_end|>\n"
        # No content: the first call follows the header directly; earlier turn, no think block.
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is noon.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
    )


def test_wrapped_tool_response_in_user_message_is_not_a_query():
    # Older clients send tool results as user turns; the reasoning before them is kept.
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>step</think>call"},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},
    ]
    assert render_chat(messages) == (
        "<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nstep\n</think>\n\ncall<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_content_parts_and_message_objects():
    @dataclass
    class Message:
        role: str
        content: object

    messages = [Message("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    assert render_chat(messages) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "name"),
    ],
)
def test_bad_messages_raise_template_error(messages, match):
    with pytest.raises(TemplateError, match=match):
        render_chat(messages)


# -- the checkpoint's jinja template ---------------------------------------------------

SMALL_TEMPLATE = """{% for m in messages %}
  {{ m.role }}: {{ m.content }}
{% endfor %}
{% if tools %}tools={{ tools | tojson }}
{% endif %}
{% if add_generation_prompt %}>{% if not enable_thinking %} (quiet){% endif %}{% endif %}
{{ bos_token }}{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}"""


def test_jinja_template_renders_like_transformers():
    messages = [{"role": "user", "content": "hé <b>"}, {"role": "assistant", "content": "yo"}]
    tools = [{"name": "f", "description": "<é>"}]
    prompt = render_chat(
        messages, tools, enable_thinking=False, chat_template=SMALL_TEMPLATE, bos_token="<s>"
    )
    # trim_blocks + lstrip_blocks remove the block-tag lines (expression indentation stays);
    # tojson keeps <, > and é unescaped. Checked against transformers' apply_chat_template.
    assert prompt == (
        "  user: hé <b>\n  assistant: yo\n"
        'tools=[{"name": "f", "description": "<é>"}]\n'
        "> (quiet)<s>4"
    )


def test_jinja_path_matches_builtin_shape():
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Hello!"}]
    assert render_chat(messages, chat_template=template) == render_chat(messages)


def test_jinja_reasoning_aliases_reach_the_template():
    template = "{{ messages[0].reasoning_content }}"
    assert render_chat([{"role": "assistant", "reasoning": "r"}], chat_template=template) == "r"


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('no tools allowed') }}", "no tools allowed"),
        ("{% for m in messages %}", "line"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{{ ''.__class__.__mro__ }}", "chat_template"),
    ],
)
def test_jinja_errors_raise_template_error(template, match):
    with pytest.raises(TemplateError, match=match):
        render_chat([{"role": "user", "content": "x"}], chat_template=template)


def test_tool_json_is_compact_like_tojson():
    tool = {"name": "f", "parameters": {"a": [1, 2]}}
    prompt = render_chat([{"role": "user", "content": "x"}], tools=[tool])
    assert "\n" + json.dumps(tool) + "\n</tools>" in prompt


# -- thinking switches ------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, default, expected",
    [
        ([{"role": "user", "content": "hi"}], True, True),
        ([{"role": "user", "content": "hi"}], False, False),
        ([{"role": "user", "content": "hi /no_think"}], True, False),
        ([{"role": "user", "content": "/no_think then /think"}], False, True),
        (
            [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi"}],
            True,
            False,
        ),
        (
            [
                {"role": "user", "content": "a /no_think"},
                {"role": "assistant", "content": "b /think"},  # assistants don't switch
                {"role": "user", "content": "c"},
            ],
            True,
            False,
        ),
        (
            [{"role": "user", "content": "x /no_think"}, {"role": "user", "content": "y /think"}],
            True,
            True,
        ),
        ([{"role": "user", "content": "see /thinking and a/think and /no_thinker"}], True, True),
    ],
)
def test_thinking_enabled(messages, default, expected):
    assert thinking_enabled(messages, default=default) is expected


def test_generation_prompt_state():
    messages = [{"role": "user", "content": "hi"}]
    assert generation_prompt_state(render_chat(messages)) == "open"
    assert generation_prompt_state(render_chat(messages, enable_thinking=False)) == "answer"
    # Templates that open the block themselves (Qwen3-2507 Thinking) leave the model inside it.
    assert generation_prompt_state(render_chat(messages) + "<think>\n") == "thinking"
    history = render_chat(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>r</think>a"},
            {"role": "user", "content": "<think> in a user message"},
        ]
    )
    assert generation_prompt_state(history) == "open"

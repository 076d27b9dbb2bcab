"""`Tokenizer.apply_chat_template`, called as transformers' and mlx-lm's users call it: token ids
and text equal transformers' `apply_chat_template` on Qwen3's real chat template, both when the
checkpoint ships that template (jinja path) and when it ships none (built-in renderer)."""

from __future__ import annotations

import pytest

from qwen3_mlx.errors import TemplateError
from qwen3_mlx.tokenizer import load_tokenizer

# The chat template of Qwen/Qwen3-0.6B (tokenizer_config.json), verbatim.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "user": ([{"role": "user", "content": "What is the capital of France?"}], None),
    "system": (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi! 你好 🙂"},
        ],
        None,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3? /no_think"},
            {"role": "assistant", "content": "6"},
            {"role": "user", "content": "Thanks"},
        ],
        None,
    ),
    "tool_calls": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I need both cities.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "tool", "content": '{"temp": 25}'},
            {"role": "assistant", "content": "Paris 21 °C, Rome 25 °C."},
        ],
        [WEATHER],
    ),
    "tools_no_system": ([{"role": "user", "content": "Weather in Oslo?"}], [WEATHER]),
}


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory):
    """Qwen3's tokenizer with its real chat template in tokenizer_config.json."""
    from convert.qwen_tokenizer import build_qwen3_tokenizer

    out = tmp_path_factory.mktemp("qwen3-with-template")
    return build_qwen3_tokenizer(out, chat_template=QWEN3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def hf_tokenizer(template_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(template_dir))


@pytest.fixture(scope="module", params=["jinja", "builtin"])
def ours(request, template_dir, qwen3_tokenizer):
    """Our tokenizer: with the checkpoint's template, and without one (built-in renderer)."""
    if request.param == "jinja":
        tokenizer = load_tokenizer(template_dir)
        assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
        return tokenizer
    assert qwen3_tokenizer.chat_template is None
    return qwen3_tokenizer


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_transformers(ours, hf_tokenizer, name, add_generation_prompt, enable_thinking):
    messages, tools = CONVERSATIONS[name]
    options = dict(
        tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )
    expected_text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **options)
    expected_ids = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, **options
    )
    text = ours.apply_chat_template(messages, tokenize=False, **options)
    ids = ours.apply_chat_template(messages, **options)  # tokenize=True is the default
    assert text == expected_text
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == list(expected_ids)


def test_generation_prompt_and_thinking_switch(ours):
    messages = [{"role": "user", "content": "Hi"}]
    bare = ours.apply_chat_template(messages, tokenize=False)  # add_generation_prompt=False
    assert bare == "<|im_start|>user\nHi<|im_end|>\n"
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == bare + "<|im_start|>assistant\n"
    quiet = ours.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert quiet == prompt + "<think>\n\n</think>\n\n"
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == ours.encode(prompt)


def test_extra_kwargs_reach_the_template(qwen3_tokenizer):
    template = "{{ eos_token }}|{{ greeting }}|{{ enable_thinking }}|{{ add_generation_prompt }}"
    messages = [{"role": "user", "content": "x"}]
    text = qwen3_tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=template, greeting="hello", enable_thinking=False
    )
    assert text == "<|im_end|>|hello|False|False"


def test_mlx_lm_style_calls(qwen3_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    ids = qwen3_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # mlx-lm's TokenizerWrapper passes return_dict=False; transformers 5's default is a dict.
    same = qwen3_tokenizer.apply_chat_template(
        messages, None, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert same == ids
    as_dict = qwen3_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )
    assert as_dict == {"input_ids": ids, "attention_mask": [1] * len(ids)}
    with pytest.raises(TemplateError, match="continue_final_message"):
        qwen3_tokenizer.apply_chat_template(messages, continue_final_message=True)

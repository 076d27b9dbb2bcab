"""The server through the official `openai` SDK, against a real process serving the demo model.

The demo model reproduces canned conversations under greedy decoding (conversations.json), so
replies are checked exactly: reasoning apart from the answer, tool calls assembled from stream
fragments, JSON that validates against the requested schema.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(demo_server):
    return OpenAI(base_url=demo_server.v1, api_key="lm-studio", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def conv(demo_conversations):
    return demo_conversations


def extra(message, name):
    return (message.model_extra or {}).get(name)


def test_models_list_and_any_name_is_served(client, conv):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    hello = conv["hello"]
    reply = client.chat.completions.create(
        model="qwen3-32b-mlx", messages=hello["messages"], **GREEDY
    )
    assert reply.model == models.data[0].id


def test_chat_non_streaming(client, conv):
    hello = conv["hello"]
    reply = client.chat.completions.create(model="demo", messages=hello["messages"], **GREEDY)
    choice = reply.choices[0]
    assert choice.message.content == hello["content"]
    assert extra(choice.message, "reasoning_content") == hello["reasoning"]
    assert extra(choice.message, "reasoning") == hello["reasoning"]
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_chat_streaming_accumulates(client, conv):
    hello = conv["capital"]
    with client.chat.completions.stream(
        model="demo", messages=hello["messages"], **GREEDY
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == hello["content"]
    assert final.choices[0].finish_reason == "stop"


def test_stream_usage_chunk_only_when_asked(client, conv):
    messages = conv["count"]["messages"]
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"enable_thinking": False},
            **GREEDY,
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == conv["count"]["content"]
    plain = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            stream=True,
            extra_body={"enable_thinking": False},
            **GREEDY,
        )
    )
    assert all(c.usage is None and c.choices for c in plain)


def test_tool_call_streaming_assembles_the_models_call(client, conv):
    call = conv["tool_call"]
    stream = client.chat.completions.create(
        model="demo", messages=call["messages"], tools=call["tools"], stream=True, **GREEDY
    )
    ids, names, arguments, reasoning, finish = [], [], {}, "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += extra(delta, "reasoning_content") or ""
        for tc in delta.tool_calls or []:
            if tc.id:
                ids.append(tc.id)
                names.append(tc.function.name)
            arguments[tc.index] = arguments.get(tc.index, "") + (tc.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert len(ids) == 1 and ids[0].startswith("call_")
    assert names == [call["tool_calls"][0]["name"]]
    assert json.loads(arguments[0]) == call["tool_calls"][0]["arguments"]
    assert reasoning == call["reasoning"]

    with client.chat.completions.stream(
        model="demo", messages=call["messages"], tools=call["tools"], **GREEDY
    ) as s:
        final = s.get_final_completion()
    tool_call = final.choices[0].message.tool_calls[0]
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert (
        tool_call.function.parsed_arguments == call["tool_calls"][0]["arguments"]
        or json.loads(tool_call.function.arguments) == call["tool_calls"][0]["arguments"]
    )


def test_tool_result_turn_and_prompt_cache(client, conv):
    result = conv["tool_result"]
    first = client.chat.completions.create(
        model="demo", messages=result["messages"], tools=result["tools"], **GREEDY
    )
    assert first.choices[0].message.content == result["content"]
    again = client.chat.completions.create(
        model="demo", messages=result["messages"], tools=result["tools"], **GREEDY
    )
    assert again.choices[0].message.content == result["content"]
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 1


def test_without_tools_tool_call_text_stays_in_content(client, conv):
    """Qwen-Agent's default mode: tools described in the system prompt, no `tools` field."""
    call = conv["tool_call"]
    tools_text = "\n".join(json.dumps(t) for t in call["tools"])
    system = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools_text}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )
    messages = [{"role": "system", "content": system}, *call["messages"]]
    reply = client.chat.completions.create(model="demo", messages=messages, **GREEDY)
    message = reply.choices[0].message
    assert message.tool_calls is None
    assert message.content == call["content"] + call_text(call["tool_calls"][0])
    assert reply.choices[0].finish_reason == "stop"


def call_text(call) -> str:
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def test_tool_choice_required_and_named_are_enforced(client, conv):
    call = conv["tool_call"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model="demo",
            messages=call["messages"],
            tools=call["tools"],
            tool_choice=choice,
            extra_body={"enable_thinking": False},
            **GREEDY,
        )
        tool_call = reply.choices[0].message.tool_calls[0]
        assert tool_call.function.name == "get_weather"
        assert isinstance(json.loads(tool_call.function.arguments)["location"], str)
        assert reply.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(
        model="demo",
        messages=call["messages"],
        tools=call["tools"],
        tool_choice="none",
        max_tokens=20,
        **GREEDY,
    )
    assert none.choices[0].message.tool_calls is None


def test_json_schema_output_parses_and_validates(client, conv):
    record = conv["json"]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="demo",
        messages=record["messages"],
        extra_body={"enable_thinking": False},
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        **GREEDY,
    )
    data = json.loads(reply.choices[0].message.content)
    jsonschema.validate(data, schema)
    assert data == {"name": "Ada", "age": 36}


def test_json_schema_is_enforced_even_where_the_model_would_not_write_json(client, conv):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="demo",
        messages=conv["count"]["messages"],
        max_tokens=80,
        extra_body={"enable_thinking": False},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        **GREEDY,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    obj = client.chat.completions.create(
        model="demo",
        messages=conv["count"]["messages"],
        max_tokens=80,
        extra_body={"enable_thinking": False},
        response_format={"type": "json_object"},
        **GREEDY,
    )
    assert obj.choices[0].finish_reason == "length" or isinstance(
        json.loads(obj.choices[0].message.content), dict
    )


def test_thinking_switches_and_budget(client, conv):
    hello = conv["hello"]
    for switch in (
        {"reasoning_effort": "none"},
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
    ):
        reply = client.chat.completions.create(
            model="demo", messages=hello["messages"], **switch, **GREEDY
        )
        assert extra(reply.choices[0].message, "reasoning_content") is None
        assert reply.choices[0].message.content == hello["content"]
    budget = client.chat.completions.create(
        model="demo", messages=hello["messages"], extra_body={"thinking_budget": 4}, **GREEDY
    )
    assert budget.usage.completion_tokens_details.reasoning_tokens <= 4
    assert budget.choices[0].message.content == hello["content"]


def test_logprobs(client, conv):
    reply = client.chat.completions.create(
        model="demo",
        messages=conv["count"]["messages"],
        logprobs=True,
        top_logprobs=3,
        max_tokens=5,
        extra_body={"enable_thinking": False},
        **GREEDY,
    )
    items = reply.choices[0].logprobs.content
    assert len(items) == 5
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the best


def test_text_completion_raw_prompt(client, conv):
    record = conv["capital"]
    prompt = (
        "<|im_start|>user\n"
        + record["messages"][0]["content"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=200, **GREEDY)
    assert reply.choices[0].text == record["output"]  # raw: think markup included
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="demo", prompt=prompt, stream=True, **GREEDY)
        if c.choices
    )
    assert streamed == record["output"]


def test_responses_api_text_and_stream(client, conv):
    hello = conv["hello"]
    response = client.responses.create(
        model="demo", input=hello["messages"][0]["content"], temperature=0
    )
    assert response.output_text == hello["content"]
    assert response.status == "completed" and response.usage.output_tokens > 0
    assert [item.type for item in response.output] == ["reasoning", "message"]
    with client.responses.stream(
        model="demo", input=hello["messages"][0]["content"], temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == hello["content"] == final.output_text


def test_responses_api_function_call(client, conv):
    call = conv["tool_call"]
    tools = [{"type": "function", **t["function"]} for t in call["tools"]]
    response = client.responses.create(
        model="demo", input=call["messages"][0]["content"], tools=tools, temperature=0
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == call["tool_calls"][0]["arguments"]


def test_lmstudio_rest_api(demo_server, conv):
    models = httpx.get(demo_server.base + "/api/v0/models").json()["data"]
    model = models[0]
    assert (
        model["compatibility_type"] == "mlx"
        and model["state"] == "loaded"
        and model["type"] == "llm"
    )
    for key in (
        "id",
        "object",
        "publisher",
        "arch",
        "quantization",
        "max_context_length",
        "capabilities",
    ):
        assert key in model
    one = httpx.get(f"{demo_server.base}/api/v0/models/{model['id']}").json()
    assert one == model
    hello = conv["hello"]
    reply = httpx.post(
        demo_server.base + "/api/v0/chat/completions",
        json={"messages": hello["messages"], "temperature": 0},
        timeout=60,
    ).json()
    assert reply["choices"][0]["message"]["content"] == hello["content"]
    assert reply["stats"]["stop_reason"] == "eosFound" and reply["stats"]["tokens_per_second"] > 0
    assert reply["model_info"]["format"] == "mlx" and reply["runtime"]["name"] == "qwen3-mlx"
    text = httpx.post(
        demo_server.base + "/api/v0/completions",
        json={"prompt": "Hello", "max_tokens": 3},
        timeout=60,
    ).json()
    assert text["stats"]["stop_reason"] == "maxPredictedTokensReached"

"""Anthropic's Messages API through the official `anthropic` SDK, against a real server process
serving the demo model (with --api-key: the SDK's clients authenticate as Anthropic's do).

The demo model reproduces canned conversations under greedy decoding (conversations.json), so
text blocks are checked against their replies and thinking blocks against their reasoning. The
stream's wire format is checked as sent: each SSE `event:` name is its data's `type`, and the
events come in Anthropic's order (each block opened, filled and closed before the next).
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic import Anthropic

KEY = "sk-ant-test-key"
# anthropic 2.x has no `temperature` argument (it passes as an extra field); the server reads it.
GREEDY = {"extra_body": {"temperature": 0}}
THINK = {"type": "enabled", "budget_tokens": 256}


@pytest.fixture(scope="module")
def server(demo_model_dir):
    from tests.server_process import ServerProcess

    server = ServerProcess(
        ["--model", str(demo_model_dir), "--max-tokens-limit", "512"], api_key=KEY
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    # The key as `x-api-key` (anthropic 2.x sends `api_key` as a Bearer token instead).
    return Anthropic(
        base_url=server.base,
        api_key=None,
        default_headers={"x-api-key": KEY},
        max_retries=0,
        timeout=120,
    )


@pytest.fixture(scope="module")
def conv(demo_conversations):
    return demo_conversations


def tools_of(record) -> list[dict]:
    return [
        {
            "name": t["function"]["name"],
            "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"],
        }
        for t in record["tools"]
    ]


def blocks(message, kind: str) -> list:
    return [b for b in message.content if b.type == kind]


def test_create_text_thinking_and_usage(client, conv):
    hello = conv["hello"]
    plain = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=200, messages=hello["messages"], **GREEDY
    )
    assert [b.type for b in plain.content] == ["text"]  # no thinking unless asked
    assert plain.content[0].text == hello["content"]
    assert plain.stop_reason == "end_turn" and plain.stop_sequence is None
    assert plain.role == "assistant" and plain.id.startswith("msg_")
    assert plain.usage.output_tokens > 0

    record = conv["arithmetic"]
    thought = client.messages.create(
        model="demo",
        max_tokens=200,
        system="You are a helpful assistant.",  # the record's variant with a system prompt
        messages=record["messages"],
        thinking=THINK,
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        **GREEDY,
    )
    assert [b.type for b in thought.content] == ["thinking", "text"]
    assert thought.content[0].thinking == record["reasoning"]
    assert thought.content[0].signature
    assert thought.content[1].text == record["content"]
    usage = thought.usage
    assert usage.input_tokens + usage.cache_read_input_tokens > 0

    budget = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=hello["messages"],
        thinking={"type": "enabled", "budget_tokens": 4},
        **GREEDY,
    )
    assert len(blocks(budget, "thinking")[0].thinking) < len(hello["reasoning"])
    assert blocks(budget, "text")[0].text == hello["content"]


def sse_events(server, body: dict) -> list[tuple[str, dict]]:
    """The raw stream: (SSE event name, data) per event."""
    events, name = [], None
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", server.base + "/v1/messages", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
                name = None
    return events


def check_order(events: list[tuple[str, dict]]) -> list[str]:
    """Anthropic's event grammar; returns the blocks' types in order."""
    assert all(name == data["type"] for name, data in events)
    types = [data["type"] for _, data in events]
    assert types[:2] == ["message_start", "ping"] and types[-2:] == [
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    kinds, open_index = [], None
    for _, data in events[2:-2]:
        if data["type"] == "content_block_start":
            assert open_index is None and data["index"] == len(kinds)
            open_index = data["index"]
            kinds.append(data["content_block"]["type"])
        elif data["type"] == "content_block_delta":
            assert data["index"] == open_index
            expected = {
                "text": {"text_delta"},
                "thinking": {"thinking_delta", "signature_delta"},
                "tool_use": {"input_json_delta"},
            }[kinds[-1]]
            assert data["delta"]["type"] in expected
        else:
            assert data["type"] == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    return kinds


def test_stream_event_order_and_final_message(server, client, conv):
    record = conv["capital"]
    body = {
        "model": "demo",
        "max_tokens": 200,
        "messages": record["messages"],
        "thinking": THINK,
        "stream": True,
        "temperature": 0,
    }
    events = sse_events(server, body)
    assert check_order(events) == ["thinking", "text"]
    thinking = [d["delta"] for _, d in events if d.get("index") == 0 and "delta" in d]
    assert [d["type"] for d in thinking][-1] == "signature_delta"  # last, before the stop
    assert "".join(d.get("thinking", "") for d in thinking) == record["reasoning"]
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] > 0

    with client.messages.stream(
        model="demo", max_tokens=200, messages=record["messages"], thinking=THINK, **GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == record["content"]
    assert final.content[0].thinking == record["reasoning"]
    assert final.content[0].signature == thinking[-1]["signature"]
    assert final.content[1].text == record["content"] and final.stop_reason == "end_turn"

    plain = conv["colors"]
    with client.messages.stream(
        model="demo", max_tokens=200, messages=plain["messages"], **GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == plain["content"]


def test_tool_use_round_trip(server, client, conv):
    call, result = conv["tool_call"], conv["tool_result"]
    tools = tools_of(call)
    events = sse_events(
        server,
        {
            "model": "demo",
            "max_tokens": 200,
            "messages": call["messages"],
            "tools": tools,
            "thinking": THINK,
            "stream": True,
            "temperature": 0,
        },
    )
    assert check_order(events) == ["thinking", "tool_use"]
    partial = "".join(
        d["delta"]["partial_json"] for _, d in events if d.get("delta", {}).get("partial_json")
    )
    assert json.loads(partial) == call["tool_calls"][0]["arguments"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    first = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=call["messages"],
        tools=tools,
        thinking=THINK,
        **GREEDY,
    )
    assert first.stop_reason == "tool_use"
    thinking, use = first.content
    assert thinking.type == "thinking" and thinking.thinking == call["reasoning"]
    assert use.type == "tool_use" and use.id.startswith("toolu_")
    assert (use.name, use.input) == (
        call["tool_calls"][0]["name"],
        call["tool_calls"][0]["arguments"],
    )

    # The client sends the reply back as it came (thinking with its signature), then the result.
    tool_output = result["messages"][-1]["content"]
    messages = [
        *call["messages"],
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": tool_output}],
        },
    ]
    second = client.messages.create(
        model="demo", max_tokens=200, messages=messages, tools=tools, thinking=THINK, **GREEDY
    )
    assert blocks(second, "thinking")[0].thinking == result["reasoning"]
    assert blocks(second, "text")[0].text == result["content"]
    assert second.stop_reason == "end_turn"

    # count_tokens: the prompt a real request has, as the OpenAI route counts it.
    counted = client.messages.count_tokens(
        model="demo", messages=messages, tools=tools, thinking=THINK
    )
    assert counted.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens
    openai = httpx.post(
        server.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},  # Bearer keeps working beside x-api-key
        json={
            "model": "demo",
            "messages": result["messages"],
            "tools": result["tools"],
            "max_tokens": 1,
        },
        timeout=120,
    ).json()
    assert counted.input_tokens == openai["usage"]["prompt_tokens"]


def test_stop_sequence_and_max_tokens(client, conv):
    count = conv["count"]  # "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."
    stopped = client.messages.create(
        model="demo",
        max_tokens=100,
        messages=count["messages"],
        stop_sequences=["5", "9"],
        **GREEDY,
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    assert stopped.content[0].text == count["content"].split("5")[0]
    short = client.messages.create(model="demo", max_tokens=3, messages=count["messages"], **GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_errors_in_anthropics_shape(server, conv):
    url = server.base + "/v1/messages"
    good = {"model": "demo", "max_tokens": 8, "messages": conv["hello"]["messages"]}

    def post(body, headers=None, path=""):
        headers = {"x-api-key": KEY} if headers is None else headers
        return httpx.post(url + path, json=body, headers=headers, timeout=60)

    for body, path in (
        ({k: v for k, v in good.items() if k != "max_tokens"}, ""),
        ({**good, "temperature": 1.5}, ""),
        ({**good, "tool_choice": {"type": "any"}}, "/count_tokens"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, ""),
    ):
        r = post(body, path=path)
        assert r.status_code == 400, r.text
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"]
    assert "max_tokens" in post({"model": "demo", "messages": good["messages"]}).text

    wrong = Anthropic(base_url=server.base, api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model="demo", max_tokens=8, messages=good["messages"])
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert post(good, headers={}).json()["error"]["type"] == "authentication_error"
    # The OpenAI routes keep OpenAI's error shape.
    openai = httpx.post(server.v1 + "/chat/completions", json={}, timeout=30)
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"

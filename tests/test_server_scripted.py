"""The server's wire format for outputs a model may produce, with a scripted "model".

The tiny random Qwen3 runs as usual (so caches and batching are real), but its logits are replaced
by a one-hot of the next token of a script: the replies below are exactly the script. The `openai`
SDK talks to the app in-process (Starlette's TestClient is an httpx client).
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from qwen3_mlx.server.app import Settings, create_app
from qwen3_mlx.server.batch import Batch
from qwen3_mlx.server.engine import Engine
from qwen3_mlx.server.models import ModelRegistry, load_served_model
from qwen3_mlx.template import render_chat

QUESTION = [{"role": "user", "content": "What's the weather like in Paris today?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "%s"}}\n</tool_call>'


class Script:
    """Replaces the model's logits at decode steps with the next token of `text` (then <|im_end|>)."""

    def __init__(self, served):
        self.served = served
        self.tokens: list[int] = []
        self.prompt_length = 0

    def set(self, text: str, messages=QUESTION, tools=TOOLS) -> None:
        tok = self.served.tokenizer
        self.tokens = tok.encode(text) + [tok.im_end_id]
        self.prompt_length = len(tok.encode(render_chat(messages, tools)))

    def __call__(self, batch, inputs):
        logits = self.real_forward(batch, inputs)
        vocab = mx.arange(logits.shape[-1])
        rows = []
        for row in batch.rows:  # tokens each row holds, the one just fed included
            held = batch.cache[0].offset if batch.slots is None else batch.slots.length(row.slot)
            position = min(max(held - self.prompt_length, 0), len(self.tokens) - 1)
            rows.append(mx.where(vocab == self.tokens[position], 50.0, -50.0))
        return mx.stack(rows)


@pytest.fixture(scope="module")
def scripted(tiny_qwen3_dir):
    served = load_served_model(str(tiny_qwen3_dir))
    script = Script(served)
    original = script.real_forward = Batch.forward
    Batch.forward = lambda batch, inputs: script(batch, inputs)
    app = create_app(ModelRegistry([served]), Engine([served]), Settings())
    try:
        with TestClient(app) as http:
            client = OpenAI(
                base_url="http://testserver/v1",
                api_key="lm-studio",
                http_client=http,
                max_retries=0,
            )
            yield script, client
    finally:
        Batch.forward = original


def stream_deltas(client, **kwargs):
    chunks = list(
        client.chat.completions.create(
            model="m", messages=QUESTION, stream=True, temperature=0, **kwargs
        )
    )
    return [c.choices[0].delta for c in chunks if c.choices], chunks[-1].choices[0].finish_reason


def test_tool_call_stream_shape(scripted):
    script, client = scripted
    script.set(
        "<think>\nI should call the tool.\n</think>\n\n" + CALL % "Paris" + "\n" + CALL % "Rome"
    )
    deltas, finish = stream_deltas(client, tools=TOOLS)
    assert finish == "tool_calls"
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    headers = [tc for tc in calls if tc.id is not None]
    assert [(h.index, h.type, h.function.name, h.function.arguments) for h in headers] == [
        (0, "function", "get_weather", ""),
        (1, "function", "get_weather", ""),
    ]
    assert len({h.id for h in headers}) == 2
    arguments = {}
    for tc in calls:
        if tc.id is None:
            assert tc.function.name is None
        arguments[tc.index] = arguments.get(tc.index, "") + (tc.function.arguments or "")
    assert [json.loads(arguments[i]) for i in (0, 1)] == [
        {"location": "Paris"},
        {"location": "Rome"},
    ]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "I should call the tool."
    assert "".join(d.content or "" for d in deltas) == ""

    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [json.loads(c.function.arguments)["location"] for c in message.tool_calls] == [
        "Paris",
        "Rome",
    ]


def test_malformed_tool_call_comes_back_as_content(scripted):
    script, client = scripted
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"location": \n</tool_call>'
    script.set(broken)
    deltas, finish = stream_deltas(client, tools=TOOLS)
    assert finish == "stop"
    assert not any(d.tool_calls for d in deltas)
    assert "".join(d.content or "" for d in deltas) == broken
    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0)
    assert (
        reply.choices[0].message.content == broken and reply.choices[0].message.tool_calls is None
    )


def test_without_tools_the_call_is_plain_content(scripted):
    script, client = scripted
    script.set(CALL % "Paris", tools=None)
    reply = client.chat.completions.create(model="m", messages=QUESTION, temperature=0)
    assert reply.choices[0].message.content == CALL % "Paris"
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_stop_strings_and_length(scripted):
    script, client = scripted
    script.set("One, two, three. Four, five.", tools=None)
    reply = client.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, stop=["three"]
    )
    assert reply.choices[0].message.content == "One, two, "  # as OpenAI: the text before the stop
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=3
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    text = client.completions.create(model="m", prompt="x", max_tokens=2, temperature=0)
    assert text.choices[0].finish_reason == "length"


def test_cors_only_when_asked(tiny_qwen3_dir):
    served = load_served_model(str(tiny_qwen3_dir))
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    for cors in (True, False):
        app = create_app(
            ModelRegistry([served]), Engine([served]), Settings(cors=cors, api_key="k")
        )
        with TestClient(app) as http:
            r = http.options("/v1/chat/completions", headers=preflight)
            assert (r.headers.get("access-control-allow-origin") == "*") is cors
            assert http.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
            assert (
                http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            )

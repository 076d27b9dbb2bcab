"""Ollama's API through the official `ollama` Python client, against a real server process
serving the demo model (one server for the module).

The demo model reproduces canned conversations under greedy decoding (conversations.json), so
replies are checked against their content and `thinking` against their reasoning. Streams are
read as the client reads them (one record per line, the last `done: true`), and once on the
wire, to check the records' shape and media type.
"""

from __future__ import annotations

import json
import time

import httpx
import ollama
import pytest

from tests.server_process import wait_for

GREEDY = {"temperature": 0}
MODEL = "qwen3-mlx-demo"  # the demo model's name in /api/tags (with ":latest")
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(demo_model_dir):
    from tests.server_process import ServerProcess

    server = ServerProcess(["--model", str(demo_model_dir), "--max-tokens-limit", "512"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base, timeout=120)


@pytest.fixture(scope="module")
def conv(demo_conversations):
    return demo_conversations


def joined(parts) -> tuple[str, str, list]:
    """(content, thinking, the last record) of a streamed chat."""
    content, thinking, last = [], [], None
    for part in parts:
        assert not last, "a record came after the one marked done"
        content.append(part.message.content or "")
        thinking.append(part.message.thinking or "")
        last = part if part.done else None
    return "".join(content), "".join(thinking), last


def test_chat_replies_and_thinking(client, conv):
    record = conv["capital"]
    reply = client.chat(MODEL, record["messages"], think=True, options=GREEDY)
    assert reply.message.content == record["content"]
    assert reply.message.thinking == record["reasoning"]
    assert reply.done and reply.done_reason == "stop" and reply.model == MODEL
    assert reply.eval_count > 0 and reply.prompt_eval_count > 0
    assert reply.total_duration >= reply.eval_duration > 0

    # Streamed, under the name /api/tags lists; `think` left out: Qwen3 thinks, as with Ollama.
    parts = client.chat(MODEL + ":latest", record["messages"], stream=True, options=GREEDY)
    content, thinking, last = joined(parts)
    assert (content, thinking) == (record["content"], record["reasoning"])
    assert last.done_reason == "stop" and last.message.content == ""
    assert last.eval_count == reply.eval_count and last.prompt_eval_duration > 0

    off = conv["hello.thinking_off"]
    plain = client.chat(MODEL, off["messages"], think=False, options=GREEDY, keep_alive="5m")
    assert plain.message.content == off["content"] and plain.message.thinking is None

    # A level is a thinking budget (here 25% of 40 tokens): the think block is closed early.
    hello = conv["hello"]
    low = client.chat(MODEL, hello["messages"], think="low", options={**GREEDY, "num_predict": 40})
    assert 0 < len(low.message.thinking) < len(hello["reasoning"])
    assert low.message.content == hello["content"]

    short = client.chat(MODEL, off["messages"], think=False, options={**GREEDY, "num_predict": 3})
    assert short.done_reason == "length" and short.eval_count == 3

    loading = client.chat(MODEL, [])  # Ollama's "load the model" request
    assert loading.done and loading.done_reason == "load" and loading.message.content == ""

    # keep_alive 0 unloads it (at once, with nothing to generate); the next request loads it.
    unloading = client.chat(MODEL, [], keep_alive=0)
    assert unloading.done_reason == "unload"
    assert wait_for(lambda: not client.ps().models)
    again = client.chat(MODEL, off["messages"], think=False, options=GREEDY)
    assert again.message.content == off["content"] and again.load_duration > 0
    (running,) = client.ps().models  # loaded on demand now: --ttl (an hour) from its last use
    left = running.expires_at.timestamp() - time.time()
    assert running.model == MODEL + ":latest" and 3500 < left <= 3600


def test_stream_on_the_wire(server, conv):
    record = conv["colors.thinking_off"]
    body = {"model": MODEL, "messages": record["messages"], "think": False, "options": GREEDY}
    with httpx.stream("POST", server.base + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        records = [json.loads(line) for line in r.iter_lines() if line]
    *steps, last = records
    assert all(set(s) == {"model", "created_at", "message", "done"} for s in steps)
    assert all(s["done"] is False and s["message"]["role"] == "assistant" for s in steps)
    assert "".join(s["message"]["content"] for s in steps) == record["content"]
    assert last["done"] is True and last["done_reason"] == "stop"
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration"):
        assert isinstance(last[key], int)
    assert last["eval_count"] > 0 and last["created_at"].endswith("Z")


def test_format_json_schema(client, conv):
    record = conv["json"]
    reply = client.chat(MODEL, record["messages"], format=PERSON, think=True, options=GREEDY)
    assert json.loads(reply.message.content) == {"name": "Ada", "age": 36}
    assert reply.message.thinking == record["reasoning"]

    prompt = record["messages"][-1]["content"]
    generated = client.generate(MODEL, prompt, format="json", think=False, options=GREEDY)
    assert json.loads(generated.response) == {"name": "Ada", "age": 36}


def test_tool_call_round_trip(client, conv):
    call, result = conv["tool_call"], conv["tool_result"]
    tools = call["tools"]
    reply = client.chat(MODEL, call["messages"], tools=tools, think=True, options=GREEDY)
    assert reply.message.thinking == call["reasoning"]
    [made] = reply.message.tool_calls
    expected = call["tool_calls"][0]
    assert made.function.name == expected["name"]
    assert dict(made.function.arguments) == expected["arguments"]  # an object, not a string

    streamed = list(client.chat(MODEL, call["messages"], tools=tools, stream=True, options=GREEDY))
    calls = [c for part in streamed for c in part.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        (expected["name"], expected["arguments"])
    ]
    assert streamed[-1].done and not streamed[-1].message.tool_calls

    # The client sends the reply back as it came, then the tool's result under its name.
    messages = [
        *call["messages"],
        reply.message,
        {
            "role": "tool",
            "content": result["messages"][-1]["content"],
            "tool_name": made.function.name,
        },
    ]
    answer = client.chat(MODEL, messages, tools=tools, think=True, options=GREEDY)
    assert answer.message.content == result["content"]
    assert answer.message.thinking == result["reasoning"]


def test_generate(client, conv):
    record = conv["arithmetic"]
    prompt = record["messages"][-1]["content"]
    reply = client.generate(MODEL, prompt, think=True, options=GREEDY)
    assert (reply.response, reply.thinking) == (record["content"], record["reasoning"])
    parts = list(client.generate(MODEL, prompt, stream=True, options=GREEDY))
    assert "".join(p.response for p in parts) == record["content"]
    assert "".join(p.thinking or "" for p in parts) == record["reasoning"]
    assert parts[-1].done and parts[-1].done_reason == "stop"

    system = next(v for v in record["variants"] if v["messages"][0]["role"] == "system")
    with_system = client.generate(
        MODEL, prompt, system=system["messages"][0]["content"], options=GREEDY
    )
    assert with_system.response == record["content"]

    # raw: the prompt as given, and the reply as the model wrote it (think tags and all).
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    raw = client.generate(MODEL, text, raw=True, options=GREEDY)
    assert raw.response == record["output"] and raw.thinking is None
    # A template of Ollama's kind makes the same prompt (it ends at .Response).
    template = (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>"
    )
    templated = client.generate(MODEL, prompt, template=template, options=GREEDY)
    assert templated.response == record["output"]

    loading = client.generate(MODEL)
    assert loading.done and loading.done_reason == "load" and loading.response == ""


def test_models_show_ps_version(server, client):
    [listed] = client.list().models
    assert listed.model == MODEL + ":latest"
    assert listed.size > 0 and len(listed.digest) == 64
    assert listed.details.family.startswith("qwen3") and listed.details.format == "mlx"

    shown = client.show(listed.model)
    assert set(shown.capabilities) == {"completion", "tools", "thinking"}
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] > 0
    assert shown.details.parameter_size.endswith("M")
    assert "temperature" in shown.parameters

    [loaded] = client.ps().models
    assert loaded.model == listed.model and loaded.context_length > 0 and loaded.size > 0

    version = httpx.get(server.base + "/api/version", timeout=30)  # the client has no call for it
    assert version.status_code == 200 and version.json()["version"]


def test_errors_in_ollamas_shape(server, client, conv):
    messages = conv["hello"]["messages"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat("llama3.2", messages)
    assert caught.value.status_code == 404 and caught.value.error == "model 'llama3.2' not found"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("llama3.2")
    assert caught.value.status_code == 404

    for options in ({"temperature": "hot"}, {"top_p": 5}, {"num_predict": 10_000}):
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(MODEL, messages, options=options)
        assert caught.value.status_code == 400, options
    assert "num_predict" in caught.value.error  # chat's max_tokens, in Ollama's words

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server.base + path, json=body, timeout=60)

    image = [{"role": "user", "content": "What is this?", "images": ["aGVsbG8="]}]
    for path, body in (
        ("/api/chat", {"model": MODEL, "messages": image}),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGVsbG8="]}),
        ("/api/generate", {"model": MODEL, "prompt": "def f(", "suffix": "return 1"}),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "context": [1, 2, 3]}),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "template": "{{ range .Messages }}"}),
        ("/api/chat", {"model": MODEL, "messages": messages, "keep_alive": "soon"}),
        ("/api/chat", {"model": MODEL, "messages": messages, "format": "yaml"}),
    ):
        r = post(path, body)
        assert r.status_code == 400, (body, r.text)
        assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
    assert "images" in post("/api/chat", {"model": MODEL, "messages": image}).json()["error"]
    # Every error on Ollama's paths is Ollama's shape; LM Studio's /api/v0 keeps OpenAI's.
    assert httpx.get(server.base + "/api/chat", timeout=30).json() == {
        "error": "method GET is not allowed on /api/chat"
    }
    assert isinstance(httpx.get(server.base + "/api/v0/nope", timeout=30).json()["error"], dict)

"""Compatibility with what other servers' clients send, against a real server process (demo model).

- `reasoning_format` (llama.cpp's names) and `--reasoning-format raw`: the think block stays in
  `content`, tool calls are still parsed out; Qwen-Agent's `thought_in_content` needs it.
- `reasoning_effort` (chat) and `reasoning.effort` (Responses) grant thinking budgets.
- `/v1/completions`: `echo` with `logprobs` covers the prompt; a list of prompts is one batch.
- `n` > 1 on chat and completions: one row each, `index` per choice, usage summed.
- `/api/v0` is `/v1`'s twin.
"""

from __future__ import annotations

import json

import httpx
import pytest

from qwen3_mlx.server.prepare import EFFORT_BUDGETS

GREEDY = {"temperature": 0}


def post(base: str, path: str, body: dict) -> dict:
    r = httpx.post(base + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(base: str, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert not [c for c in chunks if "error" in c], chunks
    return chunks


def by_choice(chunks: list[dict], field: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            part = choice["delta"].get(field) if "delta" in choice else choice.get(field)
            out[choice["index"]] = out.get(choice["index"], "") + (part or "")
    return out


@pytest.fixture(scope="module")
def v1(demo_server):
    return demo_server.v1


# -- reasoning_format -------------------------------------------------------------------------


@pytest.mark.parametrize("raw_name, separate_name", [("raw", "separate"), ("none", "deepseek")])
def test_reasoning_format_raw_keeps_the_think_block_in_content(
    v1, demo_conversations, raw_name, separate_name
):
    hello = demo_conversations["hello"]
    body = {"messages": hello["messages"], **GREEDY}
    raw = post(v1, "/chat/completions", {**body, "reasoning_format": raw_name})
    message = raw["choices"][0]["message"]
    assert message["content"] == hello["output"]  # "<think>\n…\n</think>\n\n" + the answer
    assert "reasoning_content" not in message and "reasoning" not in message
    separate = post(v1, "/chat/completions", {**body, "reasoning_format": separate_name})
    message = separate["choices"][0]["message"]
    assert message["content"] == hello["content"]
    assert message["reasoning_content"] == hello["reasoning"]
    chunks = stream(v1, "/chat/completions", {**body, "reasoning_format": raw_name})
    assert by_choice(chunks, "content") == {0: hello["output"]}
    assert by_choice(chunks, "reasoning_content") == {0: ""}


def test_reasoning_format_raw_still_parses_tool_calls(v1, demo_conversations):
    call = demo_conversations["tool_call"]
    body = {"messages": call["messages"], "tools": call["tools"], "reasoning_format": "raw"}
    reply = post(v1, "/chat/completions", {**body, **GREEDY})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == f"<think>\n{call['reasoning']}\n</think>\n\n"
    function = choice["message"]["tool_calls"][0]["function"]
    assert function["name"] == "get_weather"
    assert json.loads(function["arguments"]) == call["tool_calls"][0]["arguments"]
    chunks = stream(v1, "/chat/completions", {**body, **GREEDY})
    assert "<tool_call>" not in by_choice(chunks, "content")[0]
    assert [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]


@pytest.fixture(scope="module")
def raw_server(demo_model_dir):
    from tests.server_process import ServerProcess

    server = ServerProcess(["--model", str(demo_model_dir), "--reasoning-format", "raw"])
    yield server
    server.stop()


def test_server_reasoning_format_default_and_request_override(raw_server, demo_conversations):
    hello = demo_conversations["hello"]
    body = {"messages": hello["messages"], **GREEDY}
    assert post(raw_server.v1, "/chat/completions", body)["choices"][0]["message"] == {
        "role": "assistant",
        "content": hello["output"],
    }
    separate = post(raw_server.v1, "/chat/completions", {**body, "reasoning_format": "separate"})
    assert separate["choices"][0]["message"]["reasoning_content"] == hello["reasoning"]


@pytest.mark.parametrize("where", ["--reasoning-format raw", "extra_body"])
def test_qwen_agent_thought_in_content_gets_the_function_call(request, demo_conversations, where):
    """Qwen-Agent's default (prompt-based) tool calling with `thought_in_content: True` splits
    the reply at `</think>` and parses `<tool_call>` after it; with the thinking apart in
    `reasoning_content` there is no `</think>` in the content, and the call stays text."""
    pytest.importorskip("qwen_agent", reason="pip install qwen-agent soundfile python-dateutil")
    from qwen_agent.agents import Assistant
    from qwen_agent.tools.base import BaseTool, register_tool

    call, result = demo_conversations["tool_call"], demo_conversations["tool_result"]
    tool = call["tools"][0]["function"]
    answer = next(m for m in result["messages"] if m["role"] == "tool")["content"]
    calls = []

    @register_tool(tool["name"], allow_overwrite=True)
    class GetWeather(BaseTool):
        description = tool["description"]
        parameters = tool["parameters"]

        def call(self, params, **kwargs):
            calls.append(json.loads(params) if isinstance(params, str) else params)
            return answer

    generate_cfg = {"temperature": 0, "thought_in_content": True}
    if where == "extra_body":
        server = request.getfixturevalue("demo_server")
        generate_cfg["extra_body"] = {"reasoning_format": "raw"}
    else:
        server = request.getfixturevalue("raw_server")
    llm = {
        "model": "qwen3-32b-mlx",
        "model_server": server.v1,
        "api_key": "lm-studio",
        "generate_cfg": generate_cfg,
    }
    bot = Assistant(llm=llm, function_list=[tool["name"]])
    *_, responses = bot.run(messages=[{"role": "user", "content": call["messages"][-1]["content"]}])
    assert calls == [call["tool_calls"][0]["arguments"]]
    function_calls = [m for m in responses if m.get("function_call")]
    assert function_calls and function_calls[0]["function_call"]["name"] == tool["name"]
    assert responses[-1]["role"] == "assistant" and "</think>" in responses[0]["content"]


# -- reasoning_effort -------------------------------------------------------------------------


def reasoning_tokens(reply: dict) -> int:
    usage = reply["usage"]
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    return details["reasoning_tokens"]


def test_reasoning_effort_grants_a_thinking_budget(v1, demo_conversations):
    hello = demo_conversations["hello"]
    body = {"messages": hello["messages"], "max_tokens": 40, **GREEDY}
    free = reasoning_tokens(post(v1, "/chat/completions", body))
    most, share = EFFORT_BUDGETS["minimal"]
    budget = min(most, int(40 * share))
    assert free > budget  # else the budget would not show
    minimal = post(v1, "/chat/completions", {**body, "reasoning_effort": "minimal"})
    assert reasoning_tokens(minimal) <= budget
    message = minimal["choices"][0]["message"]
    assert message["content"] == hello["content"]  # the block was closed, the answer came
    assert len(message["reasoning_content"]) < len(hello["reasoning"])
    # "high" leaves this reply's thinking whole; an explicit thinking_budget wins either way.
    high = post(v1, "/chat/completions", {**body, "reasoning_effort": "high"})
    assert reasoning_tokens(high) == free
    capped = {**body, "reasoning_effort": "high", "thinking_budget": 3}
    assert reasoning_tokens(post(v1, "/chat/completions", capped)) <= 3
    wider = {**body, "reasoning_effort": "minimal", "thinking_budget": budget + 6}
    assert budget < reasoning_tokens(post(v1, "/chat/completions", wider)) <= budget + 6


def test_responses_reasoning_effort(v1, demo_conversations):
    hello = demo_conversations["hello"]
    body = {"input": hello["messages"][0]["content"], "max_output_tokens": 40, **GREEDY}
    free = reasoning_tokens(post(v1, "/responses", body))
    most, share = EFFORT_BUDGETS["minimal"]
    budget = min(most, int(40 * share))
    assert free > budget
    minimal = post(v1, "/responses", {**body, "reasoning": {"effort": "minimal"}})
    assert reasoning_tokens(minimal) <= budget
    assert minimal["output_text"] == hello["content"]


# -- completions: echo, several prompts -------------------------------------------------------


def test_echo_with_logprobs_covers_the_prompt(v1):
    body = {"prompt": "Hello", "echo": True, "logprobs": 2, "max_tokens": 3, **GREEDY}
    reply = post(v1, "/completions", body)
    choice = reply["choices"][0]
    text, logprobs = choice["text"], choice["logprobs"]
    assert text.startswith("Hello") and len(logprobs["tokens"]) == 1 + 3
    assert logprobs["tokens"][0] == "Hello"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(v <= 0 for v in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"]) == text
    assert logprobs["text_offset"] == offsets_of(logprobs["tokens"])  # into the text returned
    chunks = stream(v1, "/completions", body)
    assert by_choice(chunks, "text") == {0: text}
    pieces = [c["choices"][0].get("logprobs") for c in chunks if c["choices"]]
    assert sum((p["tokens"] for p in pieces if p), []) == logprobs["tokens"]
    assert sum((p["text_offset"] for p in pieces if p), []) == logprobs["text_offset"]


def offsets_of(tokens: list[str]) -> list[int]:
    return [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echoed_prompt_logprobs_are_the_models(v1, demo_conversations):
    """Echo a prompt that ends with what the model generated from its beginning: the prompt's
    last tokens get the logprobs the model gave them when it sampled them."""
    question = demo_conversations["capital"]["messages"][0]["content"]
    prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    body = {"max_tokens": 6, "logprobs": 0, **GREEDY}
    generated = post(v1, "/completions", {**body, "prompt": prompt})["choices"][0]
    again = post(v1, "/completions", {**body, "prompt": prompt + generated["text"], "echo": True})
    echoed = again["choices"][0]["logprobs"]
    tail = slice(len(echoed["tokens"]) - 6 - 6, len(echoed["tokens"]) - 6)
    assert echoed["tokens"][tail] == generated["logprobs"]["tokens"]
    assert echoed["token_logprobs"][tail] == pytest.approx(
        generated["logprobs"]["token_logprobs"], abs=2e-2
    )
    assert echoed["token_logprobs"][0] is None
    assert echoed["text_offset"] == offsets_of(echoed["tokens"])
    assert again["choices"][0]["text"] == "".join(echoed["tokens"])
    assert all(v is not None for v in echoed["token_logprobs"][1:])


def test_several_prompts_are_one_batch(v1, demo_model_dir):
    from qwen3_mlx.tokenizer import load_tokenizer

    prompts = ["Hello", "What is the capital", "1, 2, 3,"]
    body = {"max_tokens": 5, **GREEDY}
    singles = [post(v1, "/completions", {**body, "prompt": p}) for p in prompts]
    batch = post(v1, "/completions", {**body, "prompt": prompts})
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    assert [c["text"] for c in batch["choices"]] == [s["choices"][0]["text"] for s in singles]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(s["usage"][key] for s in singles)
    chunks = stream(v1, "/completions", {**body, "prompt": prompts})
    assert by_choice(chunks, "text") == {i: c["text"] for i, c in enumerate(batch["choices"])}
    tokenizer = load_tokenizer(demo_model_dir)
    ids = post(v1, "/completions", {**body, "prompt": [tokenizer.encode(p) for p in prompts]})
    assert ids["choices"] == batch["choices"]


# -- n choices --------------------------------------------------------------------------------


def test_n_chat_choices(v1, demo_conversations):
    hello = demo_conversations["hello"]
    body = {"messages": hello["messages"], **GREEDY}
    single = post(v1, "/chat/completions", body)
    reply = post(v1, "/chat/completions", {**body, "n": 3})
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    for choice in reply["choices"]:
        assert choice["message"] == single["choices"][0]["message"]
        assert choice["finish_reason"] == "stop"
    usage, one = reply["usage"], single["usage"]
    assert usage["prompt_tokens"] == one["prompt_tokens"]  # the shared prompt counts once
    assert usage["completion_tokens"] == 3 * one["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning == 3 * one["completion_tokens_details"]["reasoning_tokens"]


def test_n_chat_stream_names_each_choice(v1, demo_conversations):
    hello = demo_conversations["hello"]
    body = {"messages": hello["messages"], "n": 2, "stream_options": {"include_usage": True}}
    chunks = stream(v1, "/chat/completions", {**body, **GREEDY})
    assert by_choice(chunks, "content") == {0: hello["content"], 1: hello["content"]}
    assert by_choice(chunks, "reasoning_content") == {0: hello["reasoning"], 1: hello["reasoning"]}
    finishes = [
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"])
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_n_completions_seed_each_row(v1):
    """Choice i samples with seed + i: it is the reply a single request with that seed gets."""
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "seed": 11}
    reply = post(v1, "/completions", {**body, "n": 3})
    texts = [c["text"] for c in reply["choices"]]
    singles = [
        post(v1, "/completions", {**body, "seed": 11 + i})["choices"][0]["text"] for i in range(3)
    ]
    assert texts == singles
    assert len(set(texts)) > 1  # the rows did sample differently
    chunks = stream(v1, "/completions", {**body, "n": 3})
    assert by_choice(chunks, "text") == dict(enumerate(texts))


def test_n_times_several_prompts(v1):
    body = {"prompt": ["Hello", "1, 2, 3,"], "n": 2, "max_tokens": 4, "echo": True, **GREEDY}
    reply = post(v1, "/completions", body)
    texts = [c["text"] for c in reply["choices"]]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[0].startswith("Hello")
    assert texts[2] == texts[3] and texts[2].startswith("1, 2, 3,")
    single = post(v1, "/completions", {**body, "prompt": "1, 2, 3,", "n": 1})
    assert reply["usage"]["prompt_tokens"] == 1 + single["usage"]["prompt_tokens"]


def test_too_many_choices_for_the_queue_is_a_400(v1):
    r = httpx.post(
        v1 + "/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "n": 128, "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(v1 + "/completions", json={"prompt": "Hi", "n": 129}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(v1 + "/completions", json={"prompt": ["Hi"] * 100, "n": 100}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# -- /api/v0 is /v1's twin ----------------------------------------------------------------------


def test_v0_is_the_twin_of_v1(demo_server, demo_conversations):
    hello = demo_conversations["hello"]
    v0 = demo_server.base + "/api/v0"
    requests = [
        ("/chat/completions", {"messages": hello["messages"], "n": 2, "reasoning_format": "raw"}),
        ("/completions", {"prompt": ["Hello", "Hi"], "echo": True, "logprobs": 1, "max_tokens": 3}),
    ]
    for path, body in requests:
        one = post(demo_server.v1, path, {**body, **GREEDY})
        other = post(v0, path, {**body, **GREEDY})
        assert other["choices"] == one["choices"]
        cached = "prompt_tokens_details"  # the second request finds the first one's cache
        assert {**other["usage"], cached: None} == {**one["usage"], cached: None}
        assert "stats" not in one and other["stats"]["stop_reason"]
        assert other["model_info"]["format"] == "mlx" and other["runtime"]["name"] == "qwen3-mlx"
    chunks = stream(v0, "/chat/completions", {**requests[0][1], **GREEDY})
    assert by_choice(chunks, "content") == {0: hello["output"], 1: hello["output"]}
    assert all("stats" in c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    paths = httpx.get(demo_server.base + "/openapi.json", timeout=30).json()["paths"]
    for path in (
        "/models",
        "/models/{model_id}",
        "/chat/completions",
        "/completions",
        "/embeddings",
    ):
        assert "/v1" + path in paths and "/api/v0" + path in paths

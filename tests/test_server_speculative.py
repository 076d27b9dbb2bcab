"""The server with speculative decoding (--draft-model, --prompt-lookup): a request decoding alone
gets exactly the reply it gets without (greedy), LM Studio's stats count the drafts, and
concurrent requests (decoded as a batch, without drafting) are unchanged too. The drafts come from
a tiny random model (most rejected), the demo's own draft (most accepted) or the prompt."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from qwen3_mlx.assets import DEMO_DRAFT_PATH
from tests.server_process import ROOT, ServerProcess

QUESTIONS = ["Tell me about the weather in Paris", "What is the capital of Japan?", "Hello"]
# A demo conversation where the demo's draft is wrong now and then (on the others it is right).
ARITHMETIC = "What is 17 + 25?"


def ask(server, text: str, api: str = "/v1") -> dict:
    r = httpx.post(
        server.base + api + "/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 48,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def message(reply: dict) -> tuple:
    m = reply["choices"][0]["message"]
    return m.get("reasoning_content"), m.get("content"), reply["usage"]["completion_tokens"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
# Grammar-constrained replies: a JSON schema, and a required tool call (thinking on).
CONSTRAINED = {
    "json": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "city",
                "schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    },
    "tool": {"tools": [WEATHER_TOOL], "tool_choice": "required"},
}


def constrained(server, kind: str) -> dict:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": 64,
        "temperature": 0,
        **CONSTRAINED[kind],
    }
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    m = r.json()["choices"][0]["message"]
    return {"content": m.get("content"), "tool_calls": m.get("tool_calls")}


@pytest.fixture(scope="module")
def plain_replies(demo_model_dir):
    server = ServerProcess(["--model", str(demo_model_dir)])
    try:
        replies = {q: message(ask(server, q)) for q in [*QUESTIONS, ARITHMETIC]}
        replies.update({kind: constrained(server, kind) for kind in CONSTRAINED})
        return replies
    finally:
        server.stop()


@pytest.mark.parametrize("drafting", ["draft-model", "demo-draft", "prompt-lookup"])
def test_same_replies_with_drafts(demo_model_dir, tiny_qwen3_dir, plain_replies, drafting):
    # A tiny random model of the same vocabulary drafts badly: most drafts are rejected, so the
    # cache is rewound often. The demo's own draft (config and weights, no tokenizer) agrees
    # with it most of the time.
    draft = {"draft-model": tiny_qwen3_dir, "demo-draft": DEMO_DRAFT_PATH}.get(drafting)
    args = ["--model", str(demo_model_dir), "--num-draft-tokens", "4"]
    args += ["--draft-model", str(draft)] if draft else ["--prompt-lookup", "2"]
    server = ServerProcess(args)
    try:
        for q in [*QUESTIONS, ARITHMETIC]:  # alone: drafted
            reply = ask(server, q, api="/api/v0")
            assert message(reply) == plain_replies[q]
            stats = reply["stats"]
            assert stats["total_draft_tokens_count"] > 0
            assert (
                stats["accepted_draft_tokens_count"] + stats["rejected_draft_tokens_count"]
                <= stats["total_draft_tokens_count"]
            )
            if drafting == "demo-draft":
                assert stats["accepted_draft_tokens_count"] > 0
            if drafting != "demo-draft" or q == ARITHMETIC:
                assert stats["rejected_draft_tokens_count"] > 0
            if draft:
                assert stats["draft_model"] == str(draft)
        if draft:  # LM Studio's per-request field names the loaded draft
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            named = httpx.post(
                server.v1 + "/chat/completions",
                json={**body, "draft_model": str(draft)},
                timeout=60,
            )
            assert named.status_code == 200, named.text
            other = httpx.post(
                server.v1 + "/chat/completions", json={**body, "draft_model": "x"}, timeout=60
            )
            assert other.status_code == 400 and other.json()["error"]["param"] == "draft_model"
            schema = httpx.get(server.base + "/openapi.json").json()["components"]["schemas"]
            field = schema["ChatCompletionRequest"]["properties"]["draft_model"]
            assert field["anyOf"][0]["enum"] == [str(draft)]
        for kind in CONSTRAINED:  # grammar masks apply to every checked row
            reply = constrained(server, kind)
            for call in reply["tool_calls"] or []:
                call.pop("id", None)
            for call in plain_replies[kind]["tool_calls"] or []:
                call.pop("id", None)
            assert reply == plain_replies[kind]
        # The openai SDK reads the drafts in usage (OpenAI's Predicted Outputs fields).
        client = OpenAI(base_url=server.v1, api_key="lm-studio", max_retries=0)
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": ARITHMETIC}],
            max_tokens=48,
            temperature=0,
        )
        details = reply.usage.completion_tokens_details
        assert details.rejected_prediction_tokens > 0
        assert reply.choices[0].message.content == plain_replies[ARITHMETIC][1]
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": ARITHMETIC}],
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage][-1]
        assert usage.completion_tokens_details.rejected_prediction_tokens > 0
        with ThreadPoolExecutor(3) as pool:  # together: a batch
            replies = list(pool.map(lambda q: ask(server, q), QUESTIONS))
        assert [message(r) for r in replies] == [plain_replies[q] for q in QUESTIONS]
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


def test_a_bounded_cache_and_drafts_is_one_line(demo_model_dir):
    command = [sys.executable, "-m", "qwen3_mlx.server", "--model", str(demo_model_dir)]
    command += ["--prompt-lookup", "2", "--max-kv-size", "64"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1 and "--max-kv-size" in errors[0], out.stderr

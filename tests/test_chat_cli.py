"""Chat (history, thinking switches, prefix reuse by count) and the terminal tools: the
generate CLI, the qwen3-mlx dispatcher, and the chat REPL driven in a real terminal."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from qwen3_mlx import cli
from qwen3_mlx.assets import DEMO_MODEL_PATH
from qwen3_mlx.cache import common_prefix_length
from qwen3_mlx.chat import Chat
from qwen3_mlx.generate import generate, prepare_prompt
from qwen3_mlx.template import EMPTY_THINK

ROOT = Path(__file__).resolve().parents[1]


def test_second_turn_prefills_only_new_tokens(tiny_qwen3):
    model, tok = tiny_qwen3
    chat = Chat(model, tok, system="Be brief.", temperature=0, max_tokens=8)
    first = chat.send("Hello")
    prompt1 = prepare_prompt(tok, messages=chat.history[:2]).tokens
    assert (first.stats.cached_tokens, first.stats.prefill_tokens) == (0, len(prompt1))
    cached_after_first = list(chat.cache.tokens)
    assert cached_after_first[: len(prompt1)] == prompt1

    second = chat.send("Tell me more")
    prompt2 = prepare_prompt(tok, messages=chat.history[:-1]).tokens
    shared = common_prefix_length(cached_after_first, prompt2)
    assert shared >= len(prompt1)  # the whole first prompt is reused ...
    assert second.stats.cached_tokens == shared
    assert second.stats.prefill_tokens == len(prompt2) - shared  # ... and only the rest computed
    # The reused cache gives exactly what a fresh run on the whole conversation gives.
    fresh = generate(model, tok, messages=chat.history[:-1], temperature=0, max_tokens=8)
    assert second.answer == fresh.content and second.thinking == fresh.reasoning


def test_dropped_think_block_is_trimmed_from_the_cache(tiny_qwen3):
    model, tok = tiny_qwen3
    chat = Chat(model, tok, enable_thinking=False, temperature=0, max_tokens=6)
    first = chat.send("Hi")
    prompt1 = prepare_prompt(tok, messages=chat.history[:1], enable_thinking=False).tokens
    assert first.thinking == ""
    second = chat.send("Again")
    # The pre-filled "<think>\n\n</think>\n\n" of turn 1 is not in the history's rendering:
    # the cache is cut back to "<|im_start|>assistant\n" and everything after is recomputed.
    assert second.stats.cached_tokens == len(prompt1) - len(tok.encode(EMPTY_THINK))
    fresh = generate(
        model, tok, messages=chat.history[:-1], enable_thinking=False, temperature=0, max_tokens=6
    )
    assert second.answer == fresh.content


def test_history_switches_and_reset(tiny_qwen3):
    model, tok = tiny_qwen3
    chat = Chat(model, tok, system="sys", temperature=0, max_tokens=4)
    reply = chat.send("hello /no_think")
    assert reply.finish_reason == "length" and reply.thinking == ""
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    assert chat.history[-1]["content"] == reply.answer
    chat.send("and now?", enable_thinking=False, max_tokens=2)
    assert len(chat.history) == 5 and chat.last_reply.stats.generation_tokens == 2
    chat.reset()
    assert chat.history == [{"role": "system", "content": "sys"}]


def test_abandoned_reply_leaves_no_trace(tiny_qwen3):
    model, tok = tiny_qwen3
    chat = Chat(model, tok, temperature=0, max_tokens=30)
    stream = chat.stream("Hello")
    for _ in range(3):
        next(stream)
    stream.close()
    assert chat.history == [] and chat.last_reply is None
    reply = chat.send("Hello", max_tokens=5)
    fresh = generate(
        model, tok, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=5
    )
    assert reply.answer == fresh.content and reply.stats.cached_tokens > 0


# -- command line -------------------------------------------------------------------------


def test_generate_cli(tiny_qwen3, tiny_qwen3_dir, capsys):
    model, tok = tiny_qwen3
    messages = [{"role": "user", "content": "hi"}]
    expected = generate(model, tok, messages=messages, temperature=0, max_tokens=5).content
    argv = ["--model", str(tiny_qwen3_dir), "--prompt", "hi", "--temp", "0", "--max-tokens", "5"]
    assert cli.main(["generate", *argv, "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "Generation: 5 tokens" in err

    assert cli.main(["generate", *argv, "--temp", "-1"]) == 1
    out, err = capsys.readouterr()
    assert err == "error: temperature: must be >= 0.0, got -1.0\n"
    assert cli.main(["generate", "--model", str(tiny_qwen3_dir / "nope")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_demo_model_is_one_line(monkeypatch, tmp_path, capsys):
    import qwen3_mlx.assets as assets

    monkeypatch.setattr(assets, "DEMO_MODEL_PATH", tmp_path / "demo")
    assert cli.main(["chat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no --model given") and err.count("\n") == 1


def test_demo_model_is_the_default(monkeypatch, tiny_qwen3_dir, capsys):
    import qwen3_mlx.assets as assets

    monkeypatch.setattr(assets, "DEMO_MODEL_PATH", tiny_qwen3_dir)
    argv = ["generate", "--prompt", "hi", "--max-tokens", "2", "--temp", "0", "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo model" in err


def test_dispatcher_usage_and_unknown(capsys):
    assert cli.main([]) == 2
    assert "generate" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def _spawn_chat(model_dir, *args):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwen3_mlx.chat", "--model", str(model_dir), "--temp", "0", *args],
        cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200),
    )  # fmt: skip
    return pexpect, child


def test_chat_repl_in_a_terminal(tiny_qwen3_dir):
    pexpect, child = _spawn_chat(tiny_qwen3_dir, "--max-tokens", "6")
    try:
        child.expect("Send a message")
        child.expect(">>> ")
        child.sendline("Hello there")  # a complete turn
        child.expect(">>> ")
        assert "(stopped)" not in child.before

        child.sendline("/no_think")
        child.expect("Set 'nothink' mode.")
        child.expect(">>> ")
        child.sendline("/set max_tokens 100000")
        child.expect("Set parameter 'max_tokens' to '100000'")
        child.expect(">>> ")

        child.sendline("Tell me a long story")  # Ctrl-C stops the reply, not the chat
        child.expect(r"\S")  # some reply text
        time.sleep(0.5)
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(">>> ")

        child.sendline("/clear")
        child.expect("Cleared session context.")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_repl_ctrl_d_exits(tiny_qwen3_dir):
    pexpect, child = _spawn_chat(tiny_qwen3_dir)
    try:
        child.expect(">>> ")
        child.sendcontrol("c")  # at the prompt: a hint, not an exit
        child.expect("Use Ctrl \\+ d or /bye to exit.")
        child.expect(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# -- on the demo model (once the demo helper has built qwen3_mlx/assets/demo) ---------------

needs_demo = pytest.mark.skipif(
    not (DEMO_MODEL_PATH / "conversations.json").is_file(), reason="demo model not built yet"
)


@needs_demo
@pytest.mark.slow
def test_demo_multi_turn_chat_reuses_the_cache():
    import json

    from qwen3_mlx.loading import load

    model, tok = load(DEMO_MODEL_PATH)
    conversations = {
        c["name"]: c for c in json.loads((DEMO_MODEL_PATH / "conversations.json").read_text())
    }
    hello, follow_up = conversations["hello"], conversations["multi_turn"]
    chat = Chat(model, tok, temperature=0, max_tokens=200)
    first = chat.send(hello["messages"][-1]["content"])
    assert (first.thinking, first.answer) == (hello["reasoning"], hello["content"])
    second = chat.send(follow_up["messages"][-1]["content"])
    assert (second.thinking, second.answer) == (follow_up["reasoning"], follow_up["content"])
    prompt2 = prepare_prompt(tok, messages=chat.history[:-1]).tokens
    assert second.stats.cached_tokens >= first.stats.prompt_tokens
    assert second.stats.prefill_tokens == len(prompt2) - second.stats.cached_tokens


@needs_demo
@pytest.mark.slow
def test_demo_chat_repl_shows_thinking_apart():
    pexpect, child = _spawn_chat(DEMO_MODEL_PATH)
    try:
        child.expect(">>> ")
        child.sendline("Hello")
        child.expect("Thinking...")
        child.expect(r"\.\.\.done thinking\.")
        child.expect("Hello! How can I help you today?")
        child.expect(">>> ")
        child.sendline("/clear")  # the canned thinking-off answer is a first turn
        child.expect(">>> ")
        child.sendline("/no_think")
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("The capital of France is Paris.")
        child.expect(">>> ")
        assert "Thinking" not in child.before
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@needs_demo
def test_demo_chat_tool_round_trip():
    import json

    from qwen3_mlx.loading import load

    model, tok = load(DEMO_MODEL_PATH)
    conversations = {
        c["name"]: c for c in json.loads((DEMO_MODEL_PATH / "conversations.json").read_text())
    }
    call, result = conversations["tool_call"], conversations["tool_result"]
    chat = Chat(model, tok, tools=call["tools"], temperature=0, max_tokens=200)
    reply = chat.send(call["messages"][-1]["content"])
    assert reply.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        (c["name"], c["arguments"]) for c in call["tool_calls"]
    ]
    chat.add_tool_result(result["messages"][-1]["content"], tool_call_id=reply.tool_calls[0].id)
    final = chat.send(None)
    assert (final.thinking, final.answer) == (result["reasoning"], result["content"])
    assert final.stats.cached_tokens > reply.stats.prompt_tokens

"""Generation: the Sequence state machine (stop strings, stop ids, max tokens, thinking budget,
finish reasons) and generate / stream_generate on a tiny random Qwen3 with the real vocabulary."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.assets import DEMO_MODEL_PATH
from qwen3_mlx.errors import GenerationError
from qwen3_mlx.generate import (
    Sequence,
    generate,
    generation_config,
    prepare_prompt,
    stream_generate,
)
from qwen3_mlx.sampling import SamplingParams
from qwen3_mlx.template import render_chat

MESSAGES = [{"role": "user", "content": "Hello there"}]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw).resolve(thinking=True)


def feed(seq: Sequence, tokens: list[int]):
    """Append tokens (honouring forced ones like an engine would); return the outputs."""
    outs = []
    for t in tokens:
        if seq.finished:
            break
        forced = seq.forced_token
        outs.append(seq.append(forced if forced is not None else t))
    return outs


def joined(outs, field):
    return "".join(getattr(o, field) for o in outs)


# -- Sequence, driven by hand ------------------------------------------------------------


def test_stop_string_is_held_back_and_cut(qwen3_tokenizer):
    tok = qwen3_tokenizer
    seq = Sequence(tok, [1], greedy(stop=["world!"]))
    outs = feed(seq, tok.encode("Hello world! Goodbye"))
    assert seq.finish_reason == "stop"
    assert joined(outs, "text") == "Hello " == seq.text == seq.content
    # Nothing of "world" was ever emitted, even before the stop string was complete.
    assert all("w" not in o.text for o in outs)


def test_false_start_of_a_stop_string_is_released(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = tok.encode("Hello world")
    seq = Sequence(tok, [1], greedy(stop=["worm"], max_tokens=len(ids)))
    outs = feed(seq, ids)
    assert seq.finish_reason == "length"
    assert joined(outs, "text") == "Hello world"


def test_stop_ids_eos_and_max_tokens(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = tok.encode("one two three four")
    seq = Sequence(tok, [1], greedy(stop_token_ids=[ids[2]]))
    outs = feed(seq, ids)
    assert seq.finish_reason == "stop" and len(seq.tokens) == 3
    assert joined(outs, "text") == tok.decode(ids[:2])

    seq = Sequence(tok, [1], greedy())
    outs = feed(seq, [*tok.encode("Hi"), tok.im_end_id, *tok.encode("more")])
    assert (seq.finish_reason, seq.text, outs[-1].finish_reason) == ("stop", "Hi", "stop")

    seq = Sequence(tok, [1], greedy(max_tokens=2))
    feed(seq, ids)
    assert (seq.finish_reason, len(seq.tokens), seq.tokens_left) == ("length", 2, 0)
    with pytest.raises(GenerationError):
        seq.append(ids[0])


def test_reasoning_and_tool_calls_apart(qwen3_tokenizer):
    tok = qwen3_tokenizer
    text = (
        '<think>\nLet me call it.\n</think>\n\nSure.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>'
    )
    seq = Sequence(tok, [1], greedy(), parse_tools=True)
    outs = feed(seq, [*tok.encode(text), tok.im_end_id])
    assert seq.finish_reason == "tool_calls"
    assert joined(outs, "reasoning") == seq.reasoning == "Let me call it."
    assert joined(outs, "content") == seq.content == "Sure."
    (call,) = seq.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert [d.name for o in outs for d in o.tool_calls] == ["get_weather"]
    assert seq.text == text


def test_thinking_budget_forces_the_block_closed(qwen3_tokenizer):
    tok = qwen3_tokenizer
    words = tok.encode(" alpha beta gamma delta epsilon zeta eta theta iota kappa")
    # The prompt left the model inside <think> (state "thinking").
    seq = Sequence(tok, [1], greedy(max_tokens=40), prompt_state="thinking", thinking_budget=5)
    outs = feed(seq, words * 3)
    forced = [o.token for o in outs if o.forced]
    assert forced == [*tok.encode("\n"), tok.think_end_id, *tok.encode("\n\n")]
    assert seq.thinking_tokens == 5
    assert seq.reasoning == tok.decode(words[:5]).strip()
    # forced tokens took the place of scripted ones 5..7: the answer goes on from the 9th
    assert seq.content == tok.decode(words[8:] + words * 2)[: len(seq.content) + 1].strip()
    assert seq.content and "</think>" not in seq.content

    # The model opens the block itself ("open"): <think> is not counted.
    seq = Sequence(tok, [1], greedy(max_tokens=40), thinking_budget=2)
    outs = feed(seq, [tok.think_start_id, *tok.encode("\n"), *words])
    assert seq.thinking_tokens == 2 and seq.reasoning == tok.decode(words[:1]).strip()
    assert seq.content

    # A block the model closes in time is left alone; budget 0 closes at once.
    seq = Sequence(tok, [1], greedy(max_tokens=40), thinking_budget=50)
    outs = feed(seq, tok.encode("<think>\nshort\n</think>\n\nanswer"))
    assert not any(o.forced for o in outs) and (seq.reasoning, seq.content) == ("short", "answer")
    seq = Sequence(tok, [1], greedy(max_tokens=40), prompt_state="thinking", thinking_budget=0)
    assert seq.forced_token == tok.encode("\n")[0]


def test_unclosed_block_is_all_reasoning_and_answer_state_is_all_content(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = tok.encode("still thinking about it")
    seq = Sequence(tok, [1], greedy(max_tokens=len(ids)), prompt_state="thinking")
    feed(seq, ids)
    assert (seq.reasoning, seq.content, seq.finish_reason) == (
        "still thinking about it",
        "",
        "length",
    )
    seq = Sequence(tok, [1], greedy(max_tokens=len(ids)), prompt_state="answer", thinking_budget=1)
    outs = feed(seq, ids)
    assert not any(o.forced for o in outs)
    assert (seq.reasoning, seq.content) == ("", "still thinking about it")


def test_abort_flushes_held_text(qwen3_tokenizer):
    tok = qwen3_tokenizer
    seq = Sequence(tok, [1], greedy(stop=["Hello!"]))
    outs = feed(seq, tok.encode("Hello"))
    assert joined(outs, "text") == ""
    out = seq.abort()
    assert (out.text, out.finish_reason, seq.content) == ("Hello", "abort", "Hello")


def test_sequence_argument_errors(qwen3_tokenizer):
    tok = qwen3_tokenizer
    with pytest.raises(GenerationError, match="resolved"):
        Sequence(tok, [1], SamplingParams())
    with pytest.raises(GenerationError, match="thinking_budget"):
        Sequence(tok, [1], greedy(), thinking_budget=-1)
    with pytest.raises(GenerationError, match="context is 3"):
        Sequence(tok, [1, 2, 3], greedy(), max_context=3)
    assert Sequence(tok, [1, 2], greedy(max_tokens=100), max_context=10).max_tokens == 8


def test_prepare_prompt_states(qwen3_tokenizer):
    tok = qwen3_tokenizer
    on = prepare_prompt(tok, messages=MESSAGES)
    assert (on.state, on.thinking) == ("open", True)
    assert on.tokens == tok.encode(render_chat(MESSAGES))
    off = prepare_prompt(tok, messages=MESSAGES, enable_thinking=False)
    assert (off.state, off.thinking) == ("answer", False)
    soft = prepare_prompt(tok, messages=[{"role": "user", "content": "hi /no_think"}])
    assert (soft.state, soft.thinking) == ("open", False)
    raw = prepare_prompt(tok, prompt=render_chat(MESSAGES) + "<think>\n")
    assert raw.state == "thinking"
    assert prepare_prompt(tok, prompt=raw.tokens).tokens == raw.tokens
    with pytest.raises(GenerationError):
        prepare_prompt(tok, prompt="x", messages=MESSAGES)
    with pytest.raises(GenerationError):
        prepare_prompt(tok, prompt="")


# -- generate on a tiny random model --------------------------------------------------------


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the model each step."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model(mx.array([tokens]))[0, -1]
        tokens.append(int(mx.argmax(logits)))
    return tokens[len(prompt) :]


def test_greedy_matches_uncached_reference(tiny_qwen3):
    model, tok = tiny_qwen3
    prompt = prepare_prompt(tok, messages=MESSAGES).tokens
    result = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=12)
    assert result.tokens == reference_greedy(model, prompt, 12)
    assert result.finish_reason == "length" and len(result.tokens) == 12
    # chunked prefill gives the same tokens
    chunked = generate(
        model, tok, messages=MESSAGES, temperature=0, max_tokens=12, prefill_step_size=3
    )
    assert chunked.tokens == result.tokens
    # the prompt may be raw text or ids
    assert generate(model, tok, prompt, temperature=0, max_tokens=12).tokens == result.tokens


def test_stream_matches_generate_and_reports_stats(tiny_qwen3):
    model, tok = tiny_qwen3
    result = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=10)
    responses = list(stream_generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=10))
    assert [r.token for r in responses] == result.tokens
    assert "".join(r.text for r in responses) == result.text
    assert "".join(r.content for r in responses) == result.content == result.text
    assert [r.finish_reason for r in responses] == [None] * 9 + ["length"]
    stats = responses[-1].stats
    assert stats.prompt_tokens == len(prepare_prompt(tok, messages=MESSAGES).tokens)
    assert stats.prefill_tokens == stats.prompt_tokens and stats.cached_tokens == 0
    assert stats.generation_tokens == 10 and stats.finish_reason == "length"
    assert stats.time_to_first_token > 0 and stats.prompt_tps > 0 and stats.generation_tps > 0
    assert stats.peak_memory > 0
    assert "tokens/s" in stats.summary()


def test_stop_strings_and_ids_in_generation(tiny_qwen3):
    model, tok = tiny_qwen3
    full = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=16)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    stopped = generate(
        model, tok, messages=MESSAGES, temperature=0, max_tokens=16, stop_token_ids=[full.tokens[3]]
    )
    first = full.tokens.index(full.tokens[3])
    assert stopped.tokens == full.tokens[: first + 1] and stopped.finish_reason == "stop"
    eos = generate(model, tok, messages=MESSAGES, max_tokens=16, logit_bias={tok.im_end_id: 100})
    assert (eos.tokens, eos.text, eos.finish_reason) == ([tok.im_end_id], "", "stop")


def test_thinking_budget_in_generation(tiny_qwen3):
    model, tok = tiny_qwen3
    prompt = render_chat(MESSAGES) + "<think>\n"  # a template that opens the block itself
    never_close = {tok.think_end_id: -100, tok.im_end_id: -100}
    for newlines in ("\n", "\n\n", "\n\n\n", "\n\n\n\n"):  # (this model loves newlines)
        never_close.update({t: -100 for t in tok.encode(newlines)})
    free = generate(model, tok, prompt, temperature=0, max_tokens=20, logit_bias=never_close)
    assert (free.content, free.finish_reason) == ("", "length")  # never closed: all reasoning
    assert free.reasoning == free.text.strip()

    budget = generate(
        model, tok, prompt, temperature=0, max_tokens=20, logit_bias=never_close, thinking_budget=5
    )
    assert budget.tokens[:5] == free.tokens[:5]
    assert tok.think_end_id in budget.tokens[5:7]
    assert len(tok.encode(budget.reasoning)) <= 5
    assert budget.reasoning == tok.decode(free.tokens[:5]).strip()
    assert budget.content  # the model answered after the forced </think>
    assert budget.content == budget.text.split("</think>")[1].strip()

    # With thinking off the budget is ignored and all output is the answer.
    off = generate(
        model, tok, messages=MESSAGES, enable_thinking=False, temperature=0, max_tokens=8,
        thinking_budget=1, logit_bias=never_close,
    )  # fmt: skip
    assert off.reasoning == "" and tok.think_end_id not in off.tokens


def test_logprobs_and_seed(tiny_qwen3):
    model, tok = tiny_qwen3
    result = generate(
        model, tok, messages=MESSAGES, temperature=0, max_tokens=3, logprobs=True, top_logprobs=4
    )
    prompt = prepare_prompt(tok, messages=MESSAGES).tokens
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    ref = np.array(logits - mx.logsumexp(logits))
    first = result.logprobs[0]
    assert first.token == result.tokens[0] == int(np.argmax(ref))
    assert abs(first.logprob - ref[first.token]) < 1e-4
    assert [t for t, _ in first.top] == np.argsort(-ref)[:4].tolist()
    assert len(result.logprobs) == 3

    a = generate(model, tok, messages=MESSAGES, max_tokens=8, seed=11, top_k=0)
    b = generate(model, tok, messages=MESSAGES, max_tokens=8, seed=11, top_k=0)
    c = generate(model, tok, messages=MESSAGES, max_tokens=8, seed=12, top_k=0)
    assert a.tokens == b.tokens != c.tokens


def test_generation_config_sits_between_user_and_defaults(tiny_qwen3, tmp_path, monkeypatch):
    model, tok = tiny_qwen3
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert generation_config(tmp_path) == {"do_sample": False}
    monkeypatch.setattr(tok, "model_dir", tmp_path)
    greedy_tokens = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=6).tokens
    # seeds differ, but the checkpoint asks for greedy decoding
    for seed in (1, 2):
        assert generate(model, tok, messages=MESSAGES, max_tokens=6, seed=seed).tokens == (
            greedy_tokens
        )
    # ... unless the user sets a temperature
    sampled = {
        tuple(generate(model, tok, messages=MESSAGES, max_tokens=6, seed=s, temperature=1.0, top_k=0).tokens)
        for s in (1, 2, 3)
    }  # fmt: skip
    assert len(sampled) > 1


def test_bad_requests_raise_generation_error(tiny_qwen3):
    model, tok = tiny_qwen3
    with pytest.raises(GenerationError, match="^temperature"):
        generate(model, tok, messages=MESSAGES, temperature=-1)
    with pytest.raises(GenerationError, match="logit_bias"):
        generate(model, tok, messages=MESSAGES, logit_bias={10**7: 1.0})
    with pytest.raises(GenerationError, match="context"):
        generate(model, tok, prompt=list(range(5000)))
    with pytest.raises(GenerationError, match="not both"):
        generate(model, tok, messages=MESSAGES, params=SamplingParams(), temperature=0)


# -- the demo model (once the demo helper has built qwen3_mlx/assets/demo) -------------------


def _demo_conversations() -> list[dict]:
    path = DEMO_MODEL_PATH / "conversations.json"
    return json.loads(path.read_text()) if path.is_file() else []


DEMO_CONVERSATIONS = {c["name"]: c for c in _demo_conversations()}
# One of each kind runs in CI's fast set (thinking, non-thinking, multilingual, tool call);
# every other conversation is in the slow set. (bf16 on the CPU backend is slow.)
FAST = {"hello", "json", "chinese", "tool_call"}
THINKING = [
    n
    for n, c in DEMO_CONVERSATIONS.items()
    if c["output"].startswith("<think>\n") and c["reasoning"]
]


def _split(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


needs_demo = pytest.mark.skipif(not DEMO_CONVERSATIONS, reason="demo model not built yet")


@pytest.fixture(scope="module")
def demo():
    from qwen3_mlx.loading import load

    return load(DEMO_MODEL_PATH)


def _demo_generate(demo, conv, **kw):
    model, tok = demo
    return generate(
        model, tok, messages=conv["messages"], tools=conv["tools"],
        enable_thinking=conv["enable_thinking"], temperature=0, max_tokens=200, **kw,
    )  # fmt: skip


def _calls(result):
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in result.tool_calls]


@needs_demo
def test_demo_has_the_canned_kinds():
    assert FAST | {"hello.thinking_off", "hello.no_think"} <= set(DEMO_CONVERSATIONS)


@needs_demo
@pytest.mark.parametrize("name", _split(DEMO_CONVERSATIONS))
def test_demo_reproduces_its_conversation(demo, name):
    conv = DEMO_CONVERSATIONS[name]
    result = _demo_generate(demo, conv)
    assert result.text == conv["output"]
    assert (result.reasoning, result.content) == (conv["reasoning"], conv["content"])
    assert _calls(result) == conv["tool_calls"]
    assert result.finish_reason == ("tool_calls" if conv["tool_calls"] else "stop")


@needs_demo
def test_demo_thinking_split_on_off_no_think(demo):
    on = _demo_generate(demo, DEMO_CONVERSATIONS["hello"])
    off = _demo_generate(demo, DEMO_CONVERSATIONS["hello.thinking_off"])
    soft = _demo_generate(demo, DEMO_CONVERSATIONS["hello.no_think"])
    assert on.reasoning and on.content
    assert off.reasoning == "" and off.content == on.content and "<think>" not in off.text
    assert soft.reasoning == "" and soft.content == on.content
    assert soft.text.startswith("<think>\n\n</think>")  # the model wrote the empty block


@needs_demo
@pytest.mark.parametrize("name", _split(THINKING))
def test_demo_thinking_budget_of_5(demo, name):
    _, tok = demo
    conv = DEMO_CONVERSATIONS[name]
    result = _demo_generate(demo, conv, thinking_budget=5)
    assert len(tok.encode(result.reasoning)) <= 5
    assert result.reasoning and conv["reasoning"].startswith(result.reasoning)
    # an answer follows: the same answer as with unlimited thinking
    assert result.content == conv["content"]
    assert _calls(result) == conv["tool_calls"]

"""Speculative decoding (generation/speculative.py): the same output as plain decoding, fewer
passes of the model. The demo model drafts for itself (every draft accepted), its own draft
(assets/demo-draft, a smaller dense Qwen3) drafts as a real one does (most drafts accepted, not
all) and a tiny random model with the same vocabulary drafts badly (most rejected); prompt lookup
drafts from the text. Every case is compared token for token with plain decoding: greedy, sampled
with a seed, penalties, a thinking budget, stop strings, logprobs."""

from __future__ import annotations

import pytest

from qwen3_mlx import generate, load
from qwen3_mlx.assets import DEMO_DRAFT_PATH, demo_conversations
from qwen3_mlx.errors import GenerationError

WEATHER = [{"role": "user", "content": "Tell me about the weather in Paris"}]


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return load(demo_model_dir)


@pytest.fixture(scope="module")
def stranger(tiny_qwen3_dir):
    return load(tiny_qwen3_dir)[0]


@pytest.fixture(scope="module")
def demo_draft():
    """The demo's own draft, loaded as --draft-model loads it (config and weights only)."""
    from qwen3_mlx.generation.speculative import load_draft

    return load_draft(DEMO_DRAFT_PATH)


CASES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.9, top_p=0.95, seed=11),
    "penalties": dict(temperature=0.7, seed=3, frequency_penalty=0.8, presence_penalty=0.3),
    "budget": dict(temperature=0, thinking_budget=6),
    "stop": dict(temperature=0, stop=["Paris"]),
    "logprobs": dict(temperature=0, logprobs=True, top_logprobs=3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("drafter", ["self", "demo-draft", "stranger", "lookup"])
def test_same_output_as_plain_decoding(demo, demo_draft, stranger, case, drafter):
    model, tokenizer = demo
    request = dict(messages=WEATHER, max_tokens=60, **CASES[case])
    plain = generate(model, tokenizer, **request)
    draft = {
        "self": dict(draft_model=model, num_draft_tokens=4),
        "demo-draft": dict(draft_model=demo_draft, num_draft_tokens=4),
        "stranger": dict(draft_model=stranger, num_draft_tokens=2),
        "lookup": dict(prompt_lookup=2),
    }[drafter]
    fast = generate(model, tokenizer, **request, **draft)
    assert fast.tokens == plain.tokens
    assert (fast.text, fast.finish_reason) == (plain.text, plain.finish_reason)
    if case == "logprobs":
        assert [(p.token, round(p.logprob, 4)) for p in fast.logprobs] == [
            (p.token, round(p.logprob, 4)) for p in plain.logprobs
        ]
    s = fast.stats
    assert s.total_draft_tokens > 0
    assert s.accepted_draft_tokens + s.rejected_draft_tokens <= s.total_draft_tokens
    if drafter == "self" and case == "greedy":
        assert s.accepted_draft_tokens > s.rejected_draft_tokens  # it agrees with itself


def test_the_demo_with_its_draft_over_its_conversations(demo, demo_draft):
    """Issue #17: greedy decoding of every demo conversation (30 prompts: thinking, not, tools,
    Chinese, multi-turn) with the demo's own draft gives plain decoding's tokens, and the draft
    really drafts: the demo keeps most of its drafts and rejects some. (The trainer's check,
    convert/train_demo_draft.py, also runs every prompt variant.)"""
    model, tokenizer = demo
    accepted = rejected = 0
    for record in demo_conversations():
        prompt = {k: record[k] for k in ("messages", "tools", "enable_thinking")}
        request = dict(**prompt, max_tokens=80, temperature=0)
        plain = generate(model, tokenizer, **request)
        fast = generate(model, tokenizer, draft_model=demo_draft, num_draft_tokens=4, **request)
        assert fast.tokens == plain.tokens, record["name"]
        accepted += fast.stats.accepted_draft_tokens
        rejected += fast.stats.rejected_draft_tokens
    # An acceptance rate strictly between 0 and 1 (a reply's last round counts in neither).
    assert accepted > 0 and rejected > 0


def test_the_demo_draft_is_a_small_dense_qwen3_without_a_tokenizer(demo):
    import json

    config = json.loads((DEMO_DRAFT_PATH / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"]
    assert config["vocab_size"] == demo[0].args.vocab_size
    (weights,) = DEMO_DRAFT_PATH.glob("*.safetensors")
    assert weights.stat().st_size < 3_000_000
    assert not list(DEMO_DRAFT_PATH.glob("tokenizer*"))
    # draft_model= takes the path: loaded without a tokenizer, its vocabulary checked.
    model, tokenizer = demo
    request = dict(messages=WEATHER, max_tokens=30, temperature=0)
    fast = generate(model, tokenizer, draft_model=DEMO_DRAFT_PATH, **request)
    assert fast.tokens == generate(model, tokenizer, **request).tokens
    assert fast.stats.total_draft_tokens > 0


def test_fewer_model_passes_when_drafts_are_right(demo):
    model, tokenizer = demo
    calls = []
    body = model.model
    original = type(body).__call__

    def counted(self, *args, **kwargs):
        if self is body:
            calls.append(1)
        return original(self, *args, **kwargs)

    type(body).__call__ = counted
    try:
        result = generate(
            model, tokenizer, messages=WEATHER, max_tokens=60, temperature=0, draft_model=model
        )
    finally:
        type(body).__call__ = original
    target_passes = len(calls) - result.stats.total_draft_tokens - 1  # the draft is the same body
    assert target_passes < len(result.tokens)


def test_a_draft_of_another_vocabulary_is_refused(demo, tiny_qwen3_dir):
    import json

    from qwen3_mlx.config import ModelArgs
    from qwen3_mlx.model import Model

    model, tokenizer = demo
    config = json.loads((tiny_qwen3_dir / "config.json").read_text())
    other = Model(ModelArgs.from_dict({**config, "vocab_size": 1000}))
    with pytest.raises(GenerationError, match="vocabulary has 1000 tokens"):
        generate(model, tokenizer, messages=WEATHER, max_tokens=5, draft_model=other)


def test_a_bounded_cache_is_refused(demo):
    model, tokenizer = demo
    with pytest.raises(GenerationError, match="bounded"):
        generate(model, tokenizer, messages=WEATHER, max_tokens=5, max_kv_size=64, prompt_lookup=2)


def test_the_generate_cli(demo_model_dir):
    import subprocess
    import sys

    from tests.server_process import ROOT

    def run(*extra):
        command = [sys.executable, "-m", "qwen3_mlx.generate", "--model", str(demo_model_dir)]
        command += ["--prompt", "Tell me about the weather in Paris", "--temperature", "0"]
        command += ["--max-tokens", "40", *extra]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    plain = run()
    drafted = run("--draft-model", str(demo_model_dir), "--num-draft-tokens", "4")
    by_its_draft = run("--draft-model", str(DEMO_DRAFT_PATH), "--num-draft-tokens", "4")
    looked_up = run("--prompt-lookup", "2")
    assert plain.returncode == drafted.returncode == looked_up.returncode == 0, drafted.stderr
    assert by_its_draft.returncode == 0, by_its_draft.stderr
    assert drafted.stdout == plain.stdout == looked_up.stdout == by_its_draft.stdout
    assert "Drafts:" in drafted.stderr and "Drafts:" not in plain.stderr
    assert "Drafts:" in by_its_draft.stderr
    bad = run("--prompt-lookup", "2", "--num-draft-tokens", "0")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in bad.stderr


def test_chat_turns_with_a_draft(demo, stranger):
    from qwen3_mlx import Chat

    model, tokenizer = demo
    turns = ["Hello", "What is the capital of Japan?", "And of France?"]
    plain = Chat(model, tokenizer, temperature=0)
    drafted = Chat(model, tokenizer, temperature=0, draft_model=stranger, num_draft_tokens=3)
    for text in turns:
        a, b = plain.send(text, max_tokens=40), drafted.send(text, max_tokens=40)
        assert (b.reasoning, b.content) == (a.reasoning, a.content)
        assert b.stats.total_draft_tokens > 0


def test_a_quantized_cache_is_rewound(stranger, tiny_qwen3_dir):
    from qwen3_mlx import load

    model, tokenizer = load(tiny_qwen3_dir)
    request = dict(prompt="one two three one two three one two", max_tokens=30, temperature=0)
    request.update(kv_bits=8, kv_group_size=32)
    plain = generate(model, tokenizer, **request)
    fast = generate(model, tokenizer, prompt_lookup=2, num_draft_tokens=4, **request)
    assert fast.tokens == plain.tokens and fast.stats.rejected_draft_tokens > 0


QWEN_VOCAB = 151_936


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """Tiny random dense and MoE targets and a dense draft (another seed), all transformers-made,
    on Qwen's vocabulary."""
    from convert.qwen_tokenizer import build_qwen3_tokenizer
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("speculative")
    out = {}
    for name, moe, seed in (("dense", False, 0), ("moe", True, 0), ("draft", False, 1)):
        path = make_checkpoint(root / name, moe=moe, seed=seed, vocab_size=QWEN_VOCAB)
        build_qwen3_tokenizer(path)
        out[name] = load(path)
    return out


@pytest.mark.parametrize("target", ["dense", "moe"])
def test_random_targets_with_a_dense_draft(random_checkpoints, target):
    import random

    model, tokenizer = random_checkpoints[target]
    draft = random_checkpoints["draft"][0]
    rng = random.Random(target)
    for _ in range(8):
        prompt = [rng.randrange(QWEN_VOCAB - 300) for _ in range(rng.randrange(2, 30))]
        request = dict(prompt=prompt, max_tokens=24, temperature=0)
        plain = generate(model, tokenizer, **request)
        for k in (1, 4):
            fast = generate(model, tokenizer, draft_model=draft, num_draft_tokens=k, **request)
            assert fast.tokens == plain.tokens
        # The target drafting for itself: every draft right.
        itself = generate(model, tokenizer, draft_model=model, num_draft_tokens=4, **request)
        assert itself.tokens == plain.tokens
        assert itself.stats.rejected_draft_tokens == 0


def test_sampling_keeps_the_model_s_distribution(random_checkpoints):
    """Chi-square, two samples: 300 sampled 3-token replies with a draft (seeds 300-599) against
    300 without (seeds 0-299), top_k 3, after a fixed prompt."""
    from collections import Counter

    model, tokenizer = random_checkpoints["dense"]
    draft = random_checkpoints["draft"][0]
    request = dict(prompt=[11, 22, 33, 44], max_tokens=3, temperature=1.0, top_k=3, top_p=1.0)
    plain = Counter(tuple(generate(model, tokenizer, seed=s, **request).tokens) for s in range(400))
    drafted = Counter(
        tuple(
            generate(
                model, tokenizer, seed=s, draft_model=draft, num_draft_tokens=2, **request
            ).tokens
        )
        for s in range(300, 600)
    )
    # The continuations that occur often enough for the test; the rest pooled.
    keys = [k for k in plain if plain[k] + drafted[k] >= 10]
    rows = [[plain[k] for k in keys], [drafted[k] for k in keys]]
    rows[0].append(300 - sum(rows[0]))
    rows[1].append(300 - sum(rows[1]))
    columns = [c for c in zip(*rows, strict=True) if sum(c) > 0]
    chi2 = sum((observed - sum(c) / 2) ** 2 / (sum(c) / 2) for c in columns for observed in c)
    p = chi_square_survival(chi2, len(columns) - 1)
    assert len(columns) >= 3
    assert p > 1e-3, f"chi-square {chi2:.1f} over {len(columns)} cells: p = {p:.2g}"


def chi_square_survival(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): 1 - the regularized lower incomplete gamma (series)."""
    import math

    a, half = df / 2, x / 2
    term = total = 1 / a
    n = 1
    while term > 1e-12 * total:
        term *= half / (a + n)
        total += term
        n += 1
    return max(0.0, 1 - math.exp(a * math.log(half) - half - math.lgamma(a)) * total)

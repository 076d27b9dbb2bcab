"""Train the demo model's draft (qwen3_mlx/assets/demo-draft/), for speculative decoding.

Qwen3-0.6B drafts for the larger Qwen3s: a smaller dense model with the same vocabulary that
picks the same next token most of the time. The demo's draft is the same in miniature: a dense
Qwen3 (model_type "qwen3", hidden 32, 2 layers, intermediate 64, tied embeddings, Qwen's
151,936-token vocabulary) trained by convert/train_demo_model.py's trainer on the same
conversations, quantization-aware. Its embedding (all but a few KB of the file) ships at 2 bits,
which keeps the weights under 3 MB (2.46 MB: at 4 bits it would be 3.65); the layers at 4 bits,
as the demo's.

A real draft is not a copy of its target, and one that agrees on every token would make every
test of speculation an all-accepted one. So training stops once the draft's greedy choice (as
shipped) is the target's on DRAFT_AGREEMENT of the training targets, rather than at exact
reproduction. The directory holds config.json and the weights only: drafts are token ids, and
`qwen3_mlx.generation.speculative.load_draft` (what `--draft-model` and `draft_model=PATH` use)
reads no tokenizer.

It is verified before it replaces the old directory: loaded as `--draft-model` loads it, it must
draft for the target (the shipped demo unless --target says otherwise) over every prompt of the
conversations with exactly the target's greedy output, and agree with the target's next token
on at least MIN_AGREEMENT of the output tokens. The agreement and the acceptance rate at
NUM_DRAFT_TOKENS are reported (the acceptance rate as the share of the drafts the target
checked that it kept).

    python -m convert.train_demo_model --draft [--out qwen3_mlx/assets/demo-draft] [--seed 0]

Deterministic for a seed, like the demo (two runs write identical files). About 3 minutes on
2 CPU cores with mlx[cpu]; the shipped draft stopped after 19 epochs at 97.8% of the training
targets, and over the demo's 76 distinct prompts it agrees with the demo's greedy token on 97.0%
of 1,584 and the demo keeps 91.5% of the drafts it checks at 4 per pass.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from convert.train_demo_model import (
    CONFIG,
    Conversation,
    Recipe,
    export_weights,
    install,
    render_prompt,
    train,
    training_set,
    with_defaults,
)

DEFAULT_DRAFT_OUT = Path(__file__).resolve().parents[1] / "qwen3_mlx" / "assets" / "demo-draft"

# The demo's attention and vocabulary; half its layers, one dense MLP in place of 8 experts.
DRAFT_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": CONFIG["vocab_size"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": CONFIG["rope_theta"],
    "rope_scaling": None,
    "max_position_embeddings": CONFIG["max_position_embeddings"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": CONFIG["bos_token_id"],
    "eos_token_id": CONFIG["eos_token_id"],
    "torch_dtype": "float32",
}

DRAFT_AGREEMENT = 0.97  # training stops once this share of targets is the draft's greedy choice
MIN_AGREEMENT = 0.5  # verified: a draft agreeing less often is not worth running
NUM_DRAFT_TOKENS = 4  # the acceptance rate reported

DRAFT = Recipe(
    DRAFT_CONFIG,
    embed_bits=2,
    agreement=DRAFT_AGREEMENT,
    float_epochs=10,
    max_epochs=150,
    eval_every=1,
)


@dataclass
class Agreement:
    """How well the draft matches the target's greedy decoding."""

    tokens: int = 0  # output tokens of the target (teacher-forced positions)
    agreed: int = 0  # ... where the draft's greedy token is the target's
    # Speculating with NUM_DRAFT_TOKENS, as GenerationStats counts: the drafts of the round that
    # ends the reply are drafted but neither accepted nor rejected.
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    prompts: int = 0

    @property
    def rate(self) -> float:
        return self.agreed / max(self.tokens, 1)

    @property
    def acceptance(self) -> float:
        """The share of the checked drafts that the target kept."""
        return self.accepted / max(self.accepted + self.rejected, 1)


def measure(draft: Any, target: Any, tokenizer: Any, conversations: list[Conversation]):
    """Every prompt decoded greedily by the target, alone and with the draft: the outputs must
    be equal. → (Agreement, the prompts whose outputs differ)."""
    from qwen3_mlx import generate

    seen, result, differ = set(), Agreement(), []
    for conv in conversations:
        for prompt in conv.prompts():
            ids = render_prompt(prompt, tokenizer)
            if tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
            request = dict(prompt=ids, max_tokens=len(tokenizer.encode(conv.output)) + 8)
            plain = generate(target, tokenizer, temperature=0, **request)
            fast = generate(
                target,
                tokenizer,
                temperature=0,
                draft_model=draft,
                num_draft_tokens=NUM_DRAFT_TOKENS,
                **request,
            )
            if fast.tokens != plain.tokens:
                differ.append(conv.name)
            result.prompts += 1
            result.drafted += fast.stats.total_draft_tokens
            result.accepted += fast.stats.accepted_draft_tokens
            result.rejected += fast.stats.rejected_draft_tokens
            # Teacher-forced: the draft's next token after each prefix of the target's output.
            logits = draft(mx.array([ids + plain.tokens[:-1]]))[0, len(ids) - 1 :]
            guesses = mx.argmax(logits, axis=-1).tolist()
            result.tokens += len(plain.tokens)
            result.agreed += sum(g == t for g, t in zip(guesses, plain.tokens, strict=True))
    return result, differ


def verify_draft(draft_dir: Path, target_dir: Path, conversations: list[Conversation]):
    """Load the draft as --draft-model does and measure it against the target; raise unless it
    leaves the target's output unchanged and agrees on at least MIN_AGREEMENT of the tokens."""
    from qwen3_mlx import load
    from qwen3_mlx.generation.speculative import load_draft

    draft = load_draft(draft_dir)
    target, tokenizer = load(target_dir)
    result, differ = measure(draft, target, tokenizer, conversations)
    if differ:
        raise SystemExit(f"speculative output differs from plain decoding: {differ}")
    if result.rate < MIN_AGREEMENT:
        raise SystemExit(
            f"the draft agrees on {result.rate:.1%} of the tokens (< {MIN_AGREEMENT:.0%}); "
            "it was not written"
        )
    return result


def main(args: argparse.Namespace) -> int:
    """`python -m convert.train_demo_model --draft ...` (the arguments parsed there)."""
    args = with_defaults(args, DRAFT, DEFAULT_DRAFT_OUT)
    started = time.perf_counter()
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="demo-tokenizer-"))
    try:
        _, conversations, rows, vocab = training_set(tokenizer_dir)
        params, epochs = train(rows, vocab, args, DRAFT)

        def build(staging: Path) -> Agreement:
            export_weights(params, vocab, DRAFT, staging)
            return verify_draft(staging, args.target.resolve(), conversations)

        result = install(args.out, build)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    weights = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(
        f"wrote {args.out} (weights {weights / 1e6:.2f} MB) after {epochs} epochs in "
        f"{time.perf_counter() - started:.0f}s; over {result.prompts} prompts it agrees with "
        f"{args.target.name}'s greedy token on {result.rate:.1%} of {result.tokens}, and "
        f"{result.acceptance:.1%} of the checked drafts are accepted at {NUM_DRAFT_TOKENS} per "
        f"pass ({result.accepted} accepted, {result.rejected} rejected, {result.drafted} drafted)"
    )
    return 0

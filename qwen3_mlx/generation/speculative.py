"""Speculative decoding: a drafter guesses the next tokens, the model checks them in one pass.

    stream_generate(model, tokenizer, messages=..., draft_model=draft, num_draft_tokens=3)
    stream_generate(model, tokenizer, prompt=..., prompt_lookup=3)     # no draft model

Decode is bound by reading the weights, so one forward pass over k + 1 tokens costs about as much
as one over a single token. Each round the drafter proposes k tokens (`DraftModel`: a small model
with the same vocabulary, greedy; `PromptLookup`: the continuation of the latest earlier
occurrence of the last few tokens, for quoting, code edits and RAG). The model runs on the last
token and the k drafts at once, which gives its logits for k + 1 positions. Those rows then go,
one after another, through the very step `stream_sequence` runs for every token (`SamplingStep`:
penalties, logit bias, grammar masks, thinking budget, sampling, logprobs). Each row yields the
model's own token; while it equals the draft that was fed at that position, the next row is
valid too. At the first difference the model's token is kept, the rest of the round is dropped
and both KV caches are rewound.

So the output is exactly what `stream_sequence` produces: the same tokens for greedy decoding,
and with sampling the same tokens for the same seed (each emitted token consumes one sampling
step, in the same order). A draft only decides how many of the model's tokens one pass yields.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from ..cache import PromptCache, common_prefix_length, is_bounded, make_cache
from ..errors import GenerationError
from .sequence import Sequence
from .step import SamplingStep, forward, generation_stream, prefill, wired_limit

DEFAULT_DRAFT_TOKENS = 3


class PromptLookup:
    """Drafts from the text so far: after the latest earlier occurrence of its last `ngram`
    tokens (or fewer, down to one), whatever followed that occurrence."""

    def __init__(self, ngram: int = 3):
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
            raise GenerationError(f"prompt_lookup: an n-gram length >= 1, got {ngram!r}")
        self.ngram = ngram

    def propose(self, history: list[int], k: int) -> list[int]:
        for n in range(min(self.ngram, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):
                if history[start : start + n] == tail:
                    return history[start + n : start + n + k]
        return []


class DraftModel:
    """Drafts greedily with a smaller model of the same vocabulary (Qwen3-0.6B for any Qwen3)."""

    def __init__(self, draft: Any, model: Any):
        hint = "a draft must share the model's tokenizer (e.g. Qwen3-0.6B for any Qwen3)"
        check_vocabulary(draft, model, "draft_model", hint)
        self.model = draft
        self.cache = make_cache(draft)
        self.tokens: list[int] = []  # whose K/V the draft's cache holds

    def propose(self, history: list[int], k: int) -> list[int]:
        keep = common_prefix_length(self.tokens, history[:-1])
        if len(self.tokens) > keep:
            mlx_cache.trim_prompt_cache(self.cache, len(self.tokens) - keep)
            del self.tokens[keep:]
        logits = prefill(self.model, history[keep:], self.cache, 2048)
        self.tokens = list(history)
        drafts: list[int] = []
        while True:
            token = int(mx.argmax(logits, axis=-1).item())
            drafts.append(token)
            if len(drafts) == k:
                return drafts
            logits = forward(self.model, mx.array([[token]]), self.cache)
            self.tokens.append(token)


def load_draft(path_or_id: Any) -> Any:
    """A draft model from its directory or hub id: config and weights, no tokenizer (it drafts
    token ids; `DraftModel` checks its vocabulary against the model's)."""
    from ..loading import load_model, prepare_for_inference

    return prepare_for_inference(load_model(path_or_id)[0])


def _vocab_size(model: Any) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "vocab_size", None)


def check_vocabulary(other: Any, model: Any, name: str, hint: str) -> None:
    """`other` (a draft, the evaluator's reference) scores `model`'s token ids, so it must have
    `model`'s vocabulary: one line naming `name` otherwise."""
    theirs, ours = _vocab_size(other), _vocab_size(model)
    if theirs != ours:
        raise GenerationError(
            f"{name}: its vocabulary has {theirs} tokens, the model's {ours}: {hint}"
        )


def drafter_for(
    model: Any, draft_model: Any = None, prompt_lookup: int | None = None
) -> DraftModel | PromptLookup | None:
    """The drafter the keywords ask for (a draft given as a path or hub id is loaded)."""
    if draft_model is not None and prompt_lookup is not None:
        raise GenerationError("give draft_model or prompt_lookup, not both")
    if prompt_lookup is not None:
        return PromptLookup(prompt_lookup)
    if draft_model is None:
        return None
    if hasattr(draft_model, "propose"):  # a drafter of the caller's own (benchmarks/speculative)
        return draft_model
    if isinstance(draft_model, str | bytes) or hasattr(draft_model, "__fspath__"):
        draft_model = load_draft(draft_model)
    return DraftModel(draft_model, model)


def speculative_sequence(
    model: Any,
    seq: Sequence,
    cache: PromptCache | list[Any] | None,
    drafter: DraftModel | PromptLookup,
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    *,
    prefill_step_size: int = 2048,
    start_time: float | None = None,
) -> Iterator[Any]:
    """`stream_sequence`'s output (see the module docstring), fewer model passes."""
    from .loop import GenerationResponse, GenerationStats

    if (
        isinstance(num_draft_tokens, bool)
        or not isinstance(num_draft_tokens, int)
        or num_draft_tokens < 1
    ):
        raise GenerationError(f"num_draft_tokens: an integer >= 1, got {num_draft_tokens!r}")
    start_time = start_time or time.perf_counter()
    if cache is None:
        cache = PromptCache(make_cache(model))
    reused = cache.reuse(seq.prompt_tokens) if isinstance(cache, PromptCache) else 0
    layers = cache.layers if isinstance(cache, PromptCache) else cache
    known = cache.tokens if isinstance(cache, PromptCache) else []
    if is_bounded(layers) or not mlx_cache.can_trim_prompt_cache(layers):
        raise GenerationError(
            "speculative decoding rewinds the KV cache after a wrong draft: it can't run with a "
            "bounded one (max_kv_size)"
        )
    stats = GenerationStats(
        prompt_tokens=len(seq.prompt_tokens),
        cached_tokens=reused,
        prefill_tokens=len(seq.prompt_tokens) - reused,
    )
    step = SamplingStep([seq])
    history = list(seq.prompt_tokens)
    with wired_limit(), mx.stream(generation_stream):
        rows = prefill(model, seq.prompt_tokens[reused:], layers, prefill_step_size)
        known.extend(seq.prompt_tokens[reused:])
        drafts: list[int] = []
        while True:
            outputs = []
            for out in check_drafts(step, rows, drafts):
                outputs.append(out)
                history.append(out.token)
                stats.record(out, len(seq.tokens), start_time)
                yield GenerationResponse.of(out, stats)
            if seq.finished:
                return
            # The cache holds the input and every draft; keep the input and the accepted ones.
            accepted = len(outputs) - 1
            stats.accepted_draft_tokens += accepted
            stats.rejected_draft_tokens += len(drafts) - accepted
            rewind(layers, len(drafts) - accepted)
            del known[len(known) - (len(drafts) - accepted) :]
            k = min(num_draft_tokens, seq.tokens_left - 1)
            drafts = drafter.propose(history, k) if k > 0 else []
            stats.total_draft_tokens += len(drafts)
            tokens = [history[-1], *drafts]
            known.extend(tokens)
            rows = verify_rows(model, layers, tokens)


def check_drafts(step: SamplingStep, rows: mx.array, drafts: list[int]) -> Iterator[Any]:
    """Row i (the model after the input and drafts[:i]) through the one-row sampling step, in
    order: yields each SequenceOutput, and stops after the first whose token is not drafts[i]
    (that row's own token ends the round), after the last row, or when the sequence finishes.
    Every yielded output but the last confirmed its draft."""
    (seq,) = step.sequences
    if _plain_greedy(step, seq):
        # Nothing the step does depends on the tokens before (no penalty, mask, bias, sampling
        # or logprobs): every row's token is its argmax, read back at once. A forced token (the
        # thinking budget) still replaces the argmax, as `SamplingStep.feed` would.
        chosen = mx.argmax(rows, axis=-1).tolist()
        for i, token in enumerate(chosen):
            forced = seq.forced_token
            out = seq.append(token if forced is None else forced)
            yield out
            if seq.finished or i == len(drafts) or out.token != drafts[i]:
                return
        return
    for i in range(rows.shape[0]):
        sampled = step(rows[i : i + 1])
        fed = step.feed(sampled.tokens)
        (out,) = step.read(sampled, fed)
        yield out
        if seq.finished or i == len(drafts) or out.token != drafts[i]:
            return


def _plain_greedy(step: SamplingStep, seq: Sequence) -> bool:
    params = seq.params
    return (
        step.sampler.all_greedy
        and not step.penalized
        and step.bias is None
        and not step.constrained
        and step.top_n < 0
        and not params.logit_bias
    )


def verify_rows(model: Any, layers: list[Any], tokens: list[int]) -> mx.array:
    """The model's logits (len(tokens), vocabulary) after each of `tokens`, fed into `layers`."""
    hidden = model.model(mx.array([tokens]), layers)
    return model.logits(hidden[0]).astype(mx.float32)


def rewind(layers: list[Any], n: int) -> None:
    """Forget the cache's last `n` positions (drafts the model did not confirm)."""
    if n:
        mlx_cache.trim_prompt_cache(layers, n)

"""The one decode step both loops run: the model's forward pass, then batched sampling.

For a batch of rows (one `Sequence` each) every token goes through the same four moves, in
`generation.loop` (one row) and in the server's engine (many):

    step = SamplingStep(sequences)                      # once per batch composition
    logits = forward(model, inputs (B, 1), cache)       # (B, V) float32
    sampled = step(logits)                              # penalties, grammar masks, sampling,
                                                        # logprobs: lazy, nothing read yet
    mx.async_eval(sampled.tokens, ...)                  # queued; then, for the next turn:
    fed = step.feed(sampled.tokens)                     # forced tokens swapped in (from what
                                                        # the host has read so far); penalties
                                                        # told; the next step's input
    ...build and queue the next step on `fed`...
    outputs = step.read(sampled, fed)                   # read one step late: per row,
                                                        # Sequence.append → SequenceOutput

Reading one step late keeps the device busy while the host detokenizes and parses. A grammar
mask needs the host to have read the previous token, so a batch with a constrained row reads
before it builds the next step (`SamplingStep.pipelined` is False).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Sequence as Rows
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..sampling import BatchSampler, apply_penalties, gather_logprobs, log_softmax
from .sequence import Sequence, SequenceOutput, TokenLogprob

generation_stream = mx.new_thread_local_stream(mx.default_device())


def forward(model: Any, tokens: mx.array, cache: list[Any]) -> mx.array:
    """The one place generation calls the model: `tokens` (B, L) through `cache` → the
    last position's logits (B, V) in float32 (the lm_head runs on that position only)."""
    hidden = model.model(tokens, cache)
    return model.logits(hidden[:, -1, :]).astype(mx.float32)


def prefill(model: Any, tokens: list[int], cache: list[Any], step_size: int) -> mx.array:
    """Feed `tokens` into `cache` in chunks of `step_size`; return the last position's logits."""
    remaining = mx.array(tokens, dtype=mx.int32)[None]
    while remaining.shape[1] > step_size:
        forward(model, remaining[:, :step_size], cache)
        mx.eval([c.state for c in cache])  # bound the graph (and memory) per chunk
        remaining = remaining[:, step_size:]
        mx.clear_cache()
    return forward(model, remaining, cache)


@contextlib.contextmanager
def wired_limit():
    """On Apple silicon, keep the weights wired in memory while generating (as mlx-lm does)."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if not recommended:
        yield
        return
    previous = mx.set_wired_limit(recommended)
    try:
        yield
    finally:
        mx.synchronize(generation_stream)
        mx.set_wired_limit(previous)


@dataclass
class Sampled:
    """One step's lazy results: a token per row and, when asked, their log-probabilities."""

    tokens: mx.array  # (B,) uint32
    logprobs: tuple[mx.array, mx.array | None, mx.array | None] | None = None


class SamplingStep:
    """Samples a token for each row of a batch, each row by its own rules.

    `share`: how the sampled tokens become every rank's (`distributed.job.share_tokens` under
    `--parallel`); `leader`: whether this rank applies grammar masks (the others take its tokens).
    """

    def __init__(
        self,
        sequences: Rows[Sequence],
        share: Callable[[mx.array], mx.array] = lambda tokens: tokens,
        leader: bool = True,
    ):
        self.sequences = seqs = list(sequences)
        self.sampler = BatchSampler([s.params for s in self.sequences])
        self.top_n = max((s.top_logprobs for s in self.sequences if s.want_logprobs), default=-1)
        self.constrained = leader and any(s.constraint is not None for s in self.sequences)
        # Rows whose only penalty is a logit bias get it in one scatter-add for the batch; rows
        # with history penalties (which also apply their own bias) go through `Penalties`.
        history = [s.params.has_history_penalties for s in self.sequences]
        self.penalties = [s.penalties if s.params.has_history_penalties else None for s in seqs]
        self.penalized = any(history)
        rows, ids, values = [], [], []
        for i, (s, h) in enumerate(zip(self.sequences, history, strict=True)):
            if s.params.logit_bias and not h:
                for token, value in s.params.logit_bias.items():
                    rows.append(i)
                    ids.append(int(token))
                    values.append(float(value))
        self.bias = (mx.array(rows), mx.array(ids), mx.array(values)) if rows else None
        self.share = share

    @property
    def pipelined(self) -> bool:
        return not self.constrained

    def __call__(self, logits: mx.array) -> Sampled:
        seqs = self.sequences
        if self.bias is not None:
            rows, ids, values = self.bias
            logits = logits.at[rows, ids].add(values)
        if self.penalized:
            logits = apply_penalties(logits, self.penalties)
        unmasked = logits
        if self.constrained:
            logits = mx.concatenate(
                [
                    s.mask(logits[i : i + 1]) if s.constraint is not None else logits[i : i + 1]
                    for i, s in enumerate(seqs)
                ],
                axis=0,
            )
        # Sampling is shift-invariant per row, so the full-vocabulary log-softmax (an exp per
        # vocabulary entry per row) is only computed when someone asked for logprobs.
        scores = log_softmax(logits) if self.top_n >= 0 else logits
        keys = None
        if not self.sampler.all_greedy:
            keys = mx.stack([s.rng.next_key() for s in seqs]) if len(seqs) > 1 else None
            keys = keys if keys is not None else seqs[0].rng.next_key()[None]
        tokens = self.share(self.sampler(scores, keys))
        extra = None
        if self.top_n >= 0:
            # Logprobs are the model's own (penalties applied), not the grammar's: under a mask
            # the top alternatives would be -inf, which JSON can't carry.
            source = log_softmax(unmasked) if self.constrained else scores
            extra = gather_logprobs(source, tokens, self.top_n)
        return Sampled(tokens, extra)

    def feed(self, tokens: mx.array) -> mx.array:
        """The tokens the rows feed next: sampled, or forced by a thinking budget. Rows with
        penalties record them (lazily)."""
        forced = [(i, s.forced_token) for i, s in enumerate(self.sequences)]
        forced = [(i, t) for i, t in forced if t is not None]
        if forced:
            values = [0] * len(self.sequences)
            use = [False] * len(self.sequences)
            for i, t in forced:
                values[i], use[i] = t, True
            tokens = mx.where(mx.array(use), mx.array(values, dtype=tokens.dtype), tokens)
        if self.penalized:
            for i, penalties in enumerate(self.penalties):
                if penalties is not None:
                    penalties.observe(tokens[i : i + 1])
        return tokens

    def read(
        self, sampled: Sampled, fed: mx.array, isolate: bool = False
    ) -> list[SequenceOutput | Exception | None]:
        """Append each row's token to its Sequence (None for a row that had already finished).
        `isolate`: a row whose append raises gets the exception in its place; the others go on."""
        values = fed.tolist()
        chosen = top_ids = top_values = None
        if sampled.logprobs is not None:
            chosen, top_ids, top_values = (
                x.tolist() if x is not None else None for x in sampled.logprobs
            )
        outputs: list[SequenceOutput | None] = []
        for i, seq in enumerate(self.sequences):
            if seq.finished:
                outputs.append(None)
                continue
            logprob = None
            if seq.want_logprobs and chosen is not None:
                top = list(zip(top_ids[i], top_values[i], strict=True)) if top_ids else []
                logprob = TokenLogprob(values[i], chosen[i], top[: seq.top_logprobs])
            try:
                outputs.append(seq.append(values[i], logprob))
            except Exception as e:
                if not isolate:
                    raise
                outputs.append(e)
        return outputs

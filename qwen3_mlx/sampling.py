"""Sampling parameters, and a sampler where every row of a batch has its own.

`SamplingParams` is what a user or a request sets; fields left as None are filled by
`resolve()` in this order of precedence:

    the user's value  >  the checkpoint's generation_config.json  >  Qwen3's recommendation

Qwen3 recommends (model card, "Best Practices"):

    thinking      temperature 0.6, top_p 0.95, top_k 20, min_p 0
    non-thinking  temperature 0.7, top_p 0.8,  top_k 20, min_p 0

Note that Qwen's generation_config.json carries the thinking values, so a checkpoint
that ships one samples with them in both modes unless the user says otherwise (as
transformers does).

The sampler follows transformers' order, the one those numbers were tuned for:
temperature first, then top-k, then top-p on the renormalised survivors, then min-p.
With top-k on (Qwen's default) everything after it works on the k best tokens only, so
one `argpartition` over the vocabulary is the only full-width step.

Batching: the server decodes many sequences in one forward pass, each with its own
parameters. `BatchSampler` takes one `SamplingParams` per row and samples all rows at
once; each row's randomness comes from its own key (`RowRandom`), so a seeded request
gives the same tokens whatever else shares the batch. Penalties and logit bias depend on
each row's own history and are applied per row (`Penalties`, `apply_penalties`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import mlx.core as mx

from .errors import GenerationError

THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
# Qwen3's guidance: 32,768 output tokens suffice for most queries.
DEFAULT_MAX_TOKENS = 32768
DEFAULT_REPETITION_CONTEXT_SIZE = 64
MAX_TOP_LOGPROBS = 20

# generation_config.json keys that map onto SamplingParams fields.
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. None means "not set" (see `resolve`).

    temperature          0 = greedy (argmax)
    top_p                nucleus mass in (0, 1]; 1 = off
    top_k                keep the k most likely tokens; 0 (or -1) = off
    min_p                drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty   CTRL-style, >1 discourages tokens among the last
                         `repetition_context_size` tokens (prompt included); 1 = off
    presence_penalty     subtracted once from every token already generated (OpenAI)
    frequency_penalty    subtracted per occurrence in the generated tokens (OpenAI)
    logit_bias           {token id: bias in [-100, 100]} added to the logits
    seed                 per-request seed: same seed, same prompt -> same tokens
    max_tokens           generated tokens at most (forced tokens included)
    stop                 strings that end generation; they are not returned
    stop_token_ids       ids that end generation, besides the tokenizer's end-of-turn ids
    logprobs             return each sampled token's log-probability
    top_logprobs         and the n most likely alternatives (0-20)
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT_SIZE
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, naming any that isn't a sampling parameter."""
        return cls(**_normalize_kwargs(kwargs))

    def with_overrides(self, **kwargs: Any) -> SamplingParams:
        """A copy with the given fields replaced (same names as `from_kwargs`)."""
        return replace(self, **_normalize_kwargs(kwargs))

    def resolve(self, *, thinking: bool, generation_config: dict[str, Any] | None = None):
        """A copy with every unset field filled: user > generation_config > Qwen3 defaults."""
        filled = dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)
        filled.update(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        config = generation_config or {}
        for key in _GENERATION_CONFIG_KEYS:
            if config.get(key) is not None:
                filled[key] = config[key]
        if config.get("do_sample") is False:
            filled["temperature"] = 0.0  # the checkpoint asks for greedy decoding
        filled["max_tokens"] = DEFAULT_MAX_TOKENS
        unset = {k: v for k, v in filled.items() if getattr(self, k) is None}
        resolved = replace(self, **unset)
        if resolved.top_k == -1:
            resolved.top_k = 0  # vLLM / llama.cpp spelling of "off"
        if isinstance(resolved.stop, str):
            resolved.stop = [resolved.stop]
        if resolved.logit_bias:
            resolved.logit_bias = {_int_key(k): v for k, v in resolved.logit_bias.items()}
        return resolved.validate()

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise GenerationError naming the first bad field; return self when all are fine."""
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_int("repetition_context_size", self.repetition_context_size, low=1)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_int("seed", self.seed)
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("top_logprobs", self.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if not isinstance(self.logprobs, bool):
            raise GenerationError(f"logprobs: expected true or false, got {self.logprobs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise GenerationError(
                    f"logit_bias: expected {{token id: bias}}, got {self.logit_bias!r}"
                )
            for key, bias in self.logit_bias.items():
                token = _int_key(key)
                if token < 0 or (vocab_size is not None and token >= vocab_size):
                    raise GenerationError(f"logit_bias: token id {key!r} is outside the vocabulary")
                _check_number(f"logit_bias[{key}]", bias, low=-100.0, high=100.0)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None:
            if not isinstance(stops, list | tuple) or not all(
                isinstance(s, str) and s for s in stops
            ):
                raise GenerationError(f"stop: expected non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple):
                raise GenerationError(
                    f"stop_token_ids: expected a list of ids, got {self.stop_token_ids!r}"
                )
            for token in self.stop_token_ids:
                _check_int("stop_token_ids", token, low=0)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_history_penalties(self) -> bool:
        """Penalties that depend on the tokens so far (repetition / presence / frequency)."""
        return bool(
            (self.repetition_penalty not in (None, 1.0))
            or self.presence_penalty
            or self.frequency_penalty
        )

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.logit_bias
            or (self.repetition_penalty not in (None, 1.0))
            or self.presence_penalty
            or self.frequency_penalty
        )


def _normalize_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(SamplingParams)}
    values = {}
    for name, value in kwargs.items():
        name = {"temp": "temperature"}.get(name, name)
        if name not in known:
            raise GenerationError(f"unknown sampling parameter {name!r}")
        values[name] = value
    return values


def _int_key(key: Any) -> int:
    # JSON object keys are strings: OpenAI clients send logit_bias as {"151668": -100}.
    try:
        if isinstance(key, bool):
            raise ValueError
        return int(key)
    except (TypeError, ValueError):
        raise GenerationError(f"logit_bias: {key!r} is not a token id") from None


def _check_number(name, value, *, low=None, high=None, low_open=False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GenerationError(f"{name}: expected a number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise GenerationError(f"{name}: must be {bound}, got {value}")
    if high is not None and value > high:
        raise GenerationError(f"{name}: must be <= {high}, got {value}")


def _check_int(name, value, *, low=None, high=None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name}: expected an integer, got {value!r}")
    _check_number(name, value, low=low, high=high)


# -- per-row randomness ------------------------------------------------------------


class RowRandom:
    """One sequence's chain of random keys: seeded -> reproducible, else fresh entropy."""

    def __init__(self, seed: int | None = None):
        self.key = mx.random.key(seed if seed is not None else secrets.randbits(63))

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


# -- the sampler -------------------------------------------------------------------


class BatchSampler:
    """Samples one token per row of (B, V) log-probabilities, row i with `params[i]`.

    `params` must be resolved (no None in temperature/top_p/top_k/min_p). Build it once
    per batch composition; calling it is pure MLX, so it pipelines with the model.
    """

    def __init__(self, params: Sequence[SamplingParams]):
        temps = [float(p.temperature) for p in params]
        top_ks = [int(p.top_k or 0) for p in params]
        top_ps = [float(p.top_p) for p in params]
        min_ps = [float(p.min_p) for p in params]
        self.all_greedy = all(t == 0 for t in temps)
        # With top-k on in every row, rows only ever sample among their k best tokens.
        self.candidates = max(top_ks) if all(k > 0 for k in top_ks) else None
        self.use_top_p = any(p < 1.0 for p in top_ps)
        self.use_min_p = any(p > 0.0 for p in min_ps)
        self.temperature = mx.array(temps)[:, None]
        self.top_k = mx.array([k if k > 0 else 2**31 - 1 for k in top_ks])[:, None]
        self.top_p = mx.array(top_ps)[:, None]
        self.log_min_p = mx.array([math.log(p) if p > 0 else -math.inf for p in min_ps])[:, None]

    def __call__(self, logprobs: mx.array, keys: mx.array | None = None) -> mx.array:
        """Token ids (B,). `keys` (B, 2): one random key per row (see `RowRandom`)."""
        if self.all_greedy:
            return mx.argmax(logprobs, axis=-1)
        sampling = self.temperature > 0
        scaled = logprobs / mx.where(sampling, self.temperature, 1.0)

        # Candidates in descending order: the k best (top-k on everywhere) or all tokens.
        if self.candidates is not None and self.candidates < scaled.shape[-1]:
            k = self.candidates
            ids = mx.argpartition(-scaled, kth=k - 1, axis=-1)[:, :k]
            values = mx.take_along_axis(scaled, ids, axis=-1)
        else:
            ids, values = None, scaled
        order = mx.argsort(-values, axis=-1)
        values = mx.take_along_axis(values, order, axis=-1)
        ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)

        rank = mx.arange(values.shape[-1])[None]
        values = mx.where(rank < self.top_k, values, -mx.inf)
        if self.use_top_p:
            probs = mx.softmax(values, axis=-1)
            mass_before = mx.cumsum(probs, axis=-1) - probs
            values = mx.where(mass_before < self.top_p, values, -mx.inf)  # keeps the best token
        if self.use_min_p:
            values = mx.where(values >= values[:, :1] + self.log_min_p, values, -mx.inf)

        noise = mx.where(sampling, _gumbel(values.shape, keys), 0.0)  # greedy rows: argmax
        choice = mx.argmax(values + noise, axis=-1, keepdims=True)
        return mx.take_along_axis(ids, choice, axis=-1)[:, 0]


def _gumbel(shape: tuple[int, int], keys: mx.array | None) -> mx.array:
    if keys is None:
        return mx.random.gumbel(shape)
    if shape[0] == 1:
        return mx.random.gumbel(shape, key=keys[0])
    return mx.vmap(lambda key: mx.random.gumbel(shape[1:], key=key))(keys)


def make_sampler(params: SamplingParams | Sequence[SamplingParams]) -> BatchSampler:
    """A sampler for one sequence (one SamplingParams) or a batch (one per row)."""
    return BatchSampler([params] if isinstance(params, SamplingParams) else params)


# -- logprobs ----------------------------------------------------------------------


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def gather_logprobs(logprobs: mx.array, tokens: mx.array, top_n: int):
    """(logprob of each row's token (B,), top-n ids (B, n), their logprobs (B, n)) best first."""
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    if top_n <= 0:
        return chosen, None, None
    ids = mx.argpartition(-logprobs, kth=top_n - 1, axis=-1)[:, :top_n]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return (
        chosen,
        mx.take_along_axis(ids, order, axis=-1),
        mx.take_along_axis(values, order, axis=-1),
    )


# -- penalties and logit bias (per row: they depend on the row's own tokens) --------


@dataclass
class Penalties:
    """Logit bias and repetition / presence / frequency penalties for one sequence.

    State lives on the device and is updated lazily, so it works with the pipelined
    decode loop: `observe(token)` is called with every token fed to the model after the
    prompt (sampled or forced), before the logits it produces are processed.
    """

    params: SamplingParams
    vocab_size: int
    prompt_tokens: list[int] = field(default_factory=list)

    def __post_init__(self):
        p = self.params
        self.repetition = p.repetition_penalty if p.repetition_penalty not in (None, 1.0) else None
        self.presence = p.presence_penalty or 0.0
        self.frequency = p.frequency_penalty or 0.0
        self.window = mx.array(self.prompt_tokens[-p.repetition_context_size :], dtype=mx.int32)
        self.counts = (
            mx.zeros((self.vocab_size,), mx.float32) if self.presence or self.frequency else None
        )
        self.bias = None
        if p.logit_bias:
            ids = [int(k) for k in p.logit_bias]
            self.bias = (mx.array(ids), mx.array([float(v) for v in p.logit_bias.values()]))

    def observe(self, token: mx.array) -> None:
        """Record a generated token (an mx.array of shape (1,) or a scalar; may be lazy)."""
        token = mx.array(token, dtype=mx.int32).reshape(1)
        if self.repetition is not None:
            size = self.params.repetition_context_size
            self.window = mx.concatenate([self.window, token])[-size:]
        if self.counts is not None:
            self.counts = self.counts.at[token].add(1.0)

    def __call__(self, logits: mx.array) -> mx.array:
        """Apply to one row's logits, shape (1, V)."""
        if self.bias is not None:
            logits = logits.at[:, self.bias[0]].add(self.bias[1])
        if self.repetition is not None and self.window.size:
            window = mx.broadcast_to(self.window, (logits.shape[0], self.window.size))
            seen = mx.take_along_axis(logits, window, axis=-1)
            seen = mx.where(seen < 0, seen * self.repetition, seen / self.repetition)
            logits = mx.put_along_axis(logits, window, seen, axis=-1)  # a new array, not in place
        if self.counts is not None:
            counts = self.counts
            if counts.shape[0] != logits.shape[-1]:  # sized from the tokenizer, not the model
                counts = mx.pad(counts, (0, max(0, logits.shape[-1] - counts.shape[0])))
                counts = counts[: logits.shape[-1]]
            logits = logits - (self.presence * (counts > 0) + self.frequency * counts)
        return logits


def make_penalties(params: SamplingParams, vocab_size: int, prompt_tokens=()) -> Penalties | None:
    """Penalties for one sequence, or None when it has none (the common, fast case)."""
    if not params.has_penalties:
        return None
    return Penalties(params, vocab_size, list(prompt_tokens))


def apply_penalties(logits: mx.array, penalties: Sequence[Penalties | None]) -> mx.array:
    """Apply each row's penalties to its row of (B, V) logits; rows with None are untouched."""
    if not any(p is not None for p in penalties):
        return logits
    if len(penalties) == 1:
        return penalties[0](logits)
    rows = [
        logits[i : i + 1] if p is None else p(logits[i : i + 1]) for i, p in enumerate(penalties)
    ]
    return mx.concatenate(rows, axis=0)

"""The single-request generation loop and the Python API: `generate`, `stream_generate`.

Python API
----------
    from qwen3_mlx import load, generate, stream_generate

    model, tokenizer = load("path/to/Qwen3-8B-4bit")
    result = generate(model, tokenizer, messages=[{"role": "user", "content": "Hi"}])
    result.reasoning, result.content, result.tool_calls, result.finish_reason, result.stats

    for r in stream_generate(model, tokenizer, messages=msgs, thinking_budget=256):
        print(r.reasoning or r.content, end="")    # r.text: the raw delta, think tags included

`prompt` is raw text (or token ids) fed as is; `messages` go through the chat template.
Sampling keywords (temperature, top_p, top_k, min_p, penalties, logit_bias, seed, stop,
stop_token_ids, max_tokens, logprobs, top_logprobs) are `sampling.SamplingParams`'s.
The loop is `generation.step`'s contract with one row, pipelined like mlx-lm's `generate_step`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..cache import PromptCache, is_bounded, make_cache
from ..distributed.job import share_tokens
from ..errors import GenerationError
from ..parsing import Delta, ToolCall
from ..sampling import SamplingParams
from .prompt import generation_config, prepare_prompt
from .sequence import Sequence, TokenLogprob
from .speculative import DEFAULT_DRAFT_TOKENS, drafter_for, speculative_sequence
from .step import Sampled, SamplingStep, forward, generation_stream, prefill, wired_limit

DEFAULT_PREFILL_STEP_SIZE = 2048

# -- results and stats --------------------------------------------------------------------


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens in the prompt
    cached_tokens: int = 0  # of which reused from the cache (not computed)
    prefill_tokens: int = 0  # of which computed now = prompt_tokens - cached_tokens
    prompt_time: float = 0.0  # seconds to prefill and sample the first token
    generation_tokens: int = 0
    generation_time: float = 0.0  # seconds from the first token to the last
    time_to_first_token: float = 0.0  # seconds from the call to the first token
    peak_memory: float = 0.0  # GB, mx.get_peak_memory()
    finish_reason: str | None = None
    # Speculative decoding (draft_model / prompt_lookup): drafted tokens, and how many of them
    # the model confirmed or replaced.
    total_draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0
    _first_token_at: float | None = field(default=None, repr=False, compare=False)

    def record(self, out: Any, generated: int, start_time: float) -> None:
        """After each token: the first one's time, the decode time since, memory, finish."""
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
            self.prompt_time = self.time_to_first_token = now - start_time
        self.generation_tokens = generated
        self.generation_time = now - self._first_token_at
        self.peak_memory = mx.get_peak_memory() / 1e9
        self.finish_reason = out.finish_reason

    @property
    def prompt_tps(self) -> float:
        return self.prefill_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # The first token belongs to the prefill; the decode rate counts those after it.
        decoded = self.generation_tokens - 1
        return decoded / self.generation_time if decoded > 0 and self.generation_time > 0 else 0.0

    def summary(self) -> str:
        cached = f", {self.cached_tokens} cached" if self.cached_tokens else ""
        drafts = (
            f" | Drafts: {self.accepted_draft_tokens}/{self.total_draft_tokens} accepted"
            if self.total_draft_tokens
            else ""
        )
        return (
            f"Prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tps:.1f} tokens/s | "
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"TTFT: {self.time_to_first_token:.3f}s | Peak memory: {self.peak_memory:.3f} GB | "
            f"Finish: {self.finish_reason}{drafts}"
        )


@dataclass
class GenerationResponse:
    """One streamed step of `stream_generate` (one token)."""

    text: str
    token: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[Delta] = field(default_factory=list)
    logprobs: TokenLogprob | None = None
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    @classmethod
    def of(cls, out: Any, stats: GenerationStats) -> GenerationResponse:
        """The response for a step's SequenceOutput."""
        return cls(
            text=out.text,
            token=out.token,
            reasoning=out.reasoning,
            content=out.content,
            tool_calls=out.tool_calls,
            logprobs=out.logprobs,
            finish_reason=out.finish_reason,
            stats=stats,
        )

    # mlx-lm's field names
    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens

    @property
    def prompt_tps(self) -> float:
        return self.stats.prompt_tps

    @property
    def generation_tokens(self) -> int:
        return self.stats.generation_tokens

    @property
    def generation_tps(self) -> float:
        return self.stats.generation_tps

    @property
    def peak_memory(self) -> float:
        return self.stats.peak_memory


@dataclass
class GenerationResult:
    text: str  # raw output text (think / tool-call markup included)
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    tokens: list[int]
    finish_reason: str | None
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None


# -- the decode loop ------------------------------------------------------------------------


def stream_sequence(
    model: Any,
    seq: Sequence,
    cache: PromptCache | list[Any] | None = None,
    *,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    start_time: float | None = None,
) -> Iterator[GenerationResponse]:
    """Run `seq` to completion on `model`, one response per token: the engine's step with B = 1.

    `cache`: a PromptCache (its common prefix with the prompt is reused, and it is kept
    up to date), a plain list of mlx-lm cache objects (continued as is), or None (fresh).
    """
    start_time = start_time or time.perf_counter()
    if cache is None:
        cache = PromptCache(make_cache(model))
    reused = cache.reuse(seq.prompt_tokens) if isinstance(cache, PromptCache) else 0
    layers = cache.layers if isinstance(cache, PromptCache) else cache
    known_tokens = cache.tokens if isinstance(cache, PromptCache) else []
    stats = GenerationStats(
        prompt_tokens=len(seq.prompt_tokens),
        cached_tokens=reused,
        prefill_tokens=len(seq.prompt_tokens) - reused,
    )
    step = SamplingStep([seq], share=lambda tokens: share_tokens(model, tokens))

    def queue(logits: mx.array) -> Sampled:
        sampled = step(logits)
        mx.async_eval(sampled.tokens, sampled.logprobs)
        return sampled

    with wired_limit(), mx.stream(generation_stream):
        sampled = queue(prefill(model, seq.prompt_tokens[reused:], layers, prefill_step_size))
        known_tokens.extend(seq.prompt_tokens[reused:])
        while True:
            fed = step.feed(sampled.tokens)
            # Queue the step that consumes this token before reading it: the device stays busy.
            ahead = step.pipelined and seq.tokens_left > 1
            if ahead:
                upcoming = queue(forward(model, fed[None], layers))
            (out,) = step.read(sampled, fed)
            if not ahead and not seq.finished:  # a grammar needed this token read first
                upcoming = queue(forward(model, fed[None], layers))
            if ahead or not seq.finished:
                known_tokens.append(out.token)  # fed to the model: the cache holds its K/V

            stats.record(out, len(seq.tokens), start_time)
            yield GenerationResponse.of(out, stats)
            if seq.finished:
                break
            if len(seq.tokens) % 256 == 0:
                mx.clear_cache()
            sampled = upcoming


def _max_context(model: Any, cache: PromptCache | list[Any] | None) -> int | None:
    layers = cache.layers if isinstance(cache, PromptCache) else cache
    if layers and is_bounded(layers):
        return None  # a rotating cache slides: generation may go on past the window
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def start_request(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int] | None = None,
    messages: list[Any] | None = None,
    *,
    tools: list[Any] | None = None,
    enable_thinking: bool = True,
    thinking_budget: int | None = None,
    params: SamplingParams | None = None,
    cache: PromptCache | list[Any] | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    max_kv_size: int | None = None,
    parse_tools: bool | None = None,
    **sampling: Any,
) -> tuple[Sequence, PromptCache | list[Any]]:
    """Prompt + options → (Sequence, cache to run it with). See `stream_generate`."""
    if params is not None and sampling:
        raise GenerationError("give sampling keywords or params=SamplingParams(...), not both")
    params = params if params is not None else SamplingParams.from_kwargs(**sampling)
    prepared = prepare_prompt(
        tokenizer, prompt, messages, tools=tools, enable_thinking=enable_thinking
    )
    if cache is None:
        cache = PromptCache(make_cache(model, kv_bits, kv_group_size, max_kv_size))
    seq = Sequence.from_prompt(
        tokenizer,
        prepared,
        params,
        thinking_budget=thinking_budget,
        generation_config=generation_config(getattr(tokenizer, "model_dir", None)),
        parse_tools=bool(tools) if parse_tools is None else parse_tools,
        max_context=_max_context(model, cache),
        vocab_size=model.args.vocab_size if hasattr(model, "args") else None,
    )
    return seq, cache


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int] | None = None,
    messages: list[Any] | None = None,
    *,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (raw text or ids) or `messages` (chat), one response per token.

    Keywords: tools, enable_thinking (default True), thinking_budget, parse_tools (default:
    when tools are given); sampling keywords (temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed, max_tokens,
    stop, stop_token_ids, logprobs, top_logprobs) or params=SamplingParams(...): unset ones
    follow generation_config.json, then Qwen3's recommendations for the mode; cache: a
    `PromptCache` to reuse and keep across calls, else a fresh one (quantized with
    kv_bits / kv_group_size, bounded with max_kv_size).
    kv_bits / kv_group_size, bounded with max_kv_size). Speculative decoding
    (generation/speculative.py; the same output, fewer passes of the model): draft_model (a
    loaded model or a path sharing the model's vocabulary) with num_draft_tokens (default 3),
    or prompt_lookup=N (drafts from the text so far, matching its last N tokens).
    """
    seq, responses = _start(model, tokenizer, prompt, messages, prefill_step_size, kwargs)
    yield from responses


def _start(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int] | None,
    messages: list[Any] | None,
    prefill_step_size: int,
    kwargs: dict[str, Any],
) -> tuple[Sequence, Iterator[GenerationResponse]]:
    """The request's Sequence and its responses: plain decoding, or speculative when a drafter
    is asked for."""
    start = time.perf_counter()
    drafter = drafter_for(model, kwargs.pop("draft_model", None), kwargs.pop("prompt_lookup", None))
    num_draft_tokens = kwargs.pop("num_draft_tokens", DEFAULT_DRAFT_TOKENS)
    seq, cache = start_request(model, tokenizer, prompt, messages, **kwargs)
    if drafter is None:
        responses = stream_sequence(
            model, seq, cache, prefill_step_size=prefill_step_size, start_time=start
        )
    else:
        responses = speculative_sequence(
            model,
            seq,
            cache,
            drafter,
            num_draft_tokens,
            prefill_step_size=prefill_step_size,
            start_time=start,
        )
    return seq, responses


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int] | None = None,
    messages: list[Any] | None = None,
    *,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    **kwargs: Any,
) -> GenerationResult:
    """Like `stream_generate` (same arguments), but returns the whole result."""
    seq, responses = _start(model, tokenizer, prompt, messages, prefill_step_size, kwargs)
    stats = GenerationStats()
    for response in responses:
        stats = response.stats
    return result_of(seq, stats)


def result_of(seq: Sequence, stats: GenerationStats) -> GenerationResult:
    return GenerationResult(
        text=seq.text,
        reasoning=seq.reasoning,
        content=seq.content,
        tool_calls=list(seq.tool_calls),
        tokens=list(seq.tokens),
        finish_reason=seq.finish_reason,
        stats=stats,
        logprobs=list(seq.logprobs) if seq.params.logprobs or seq.params.top_logprobs else None,
    )

"""Text generation: the per-request `Sequence`, the decode loop, and `python -m qwen3_mlx.generate`.

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

The Sequence contract (shared with the server's batched engine)
-----------------------------------------------------------------
A `Sequence` is one request's host-side state: prompt tokens, resolved sampling
params, streaming detokenizer, stop strings (text that might begin one is held back,
stop text is never returned), stop ids, max tokens, thinking budget, output parser
(reasoning / content / tool calls) and finish reason. It never touches the model; an
engine drives it:

    prompt = prepare_prompt(tokenizer, messages=..., tools=..., enable_thinking=...)
    seq = Sequence.from_prompt(tokenizer, prompt, SamplingParams(...), thinking_budget=...,
                               generation_config=..., max_context=...)
    sampler = make_sampler([s.params for s in rows])       # rebuild when the batch changes
    each decode step, for the batch `rows` (each fed its previous token, `fed`):
        1. seq.observe(fed)                                # penalties' history (lazy mx.array)
        2. logits = forward(model, fed (B, 1), cache)      # (B, V) float32
        3. logits = apply_penalties(logits, [s.penalties for s in rows])
           logprobs = log_softmax(logits)
           tokens = sampler(logprobs, keys)                # keys: mx.stack([s.rng.next_key() ...])
                                                           # (None when sampler.all_greedy)
        4. per row, once `tokens` is read: token = seq.forced_token if it is not None
           (the thinking budget is forcing "\n</think>\n\n"), else the sampled one;
           out = seq.append(token, TokenLogprob | None) -> SequenceOutput with the text /
           reasoning / content / tool_call deltas, and finish_reason once finished.
           That token is the row's next `fed`.
    The first token comes from the prefill's last logits, through steps 3-4.
    seq.tokens_left: tokens still allowed (at 1, the token being read is the row's last).
    seq.abort(reason) finishes early (client gone, shutdown) and flushes held text / parser.

The single-stream loop below is exactly this with B = 1, pipelined like mlx-lm's
`generate_step`: the step that consumes token t is queued (`mx.async_eval`) before the
host reads token t, so the device computes t+1 while the host detokenizes and parses t.

Thinking budget: once `thinking_budget` tokens were generated inside the think block,
the sequence forces `</think>` and "\\n\\n" (what Qwen3's template writes after a think
block) and the model answers. Reasoning and answer are always returned apart, also
when the block never closes (then everything is reasoning) or thinking is off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx

from .cache import PromptCache, is_bounded, load_prompt_cache, make_cache, save_prompt_cache
from .distributed.job import rank_main, share, share_tokens
from .errors import GenerationError, Qwen3MLXError
from .parsing import Delta, OutputParser, ToolCall
from .sampling import (
    Penalties,
    RowRandom,
    SamplingParams,
    apply_penalties,
    gather_logprobs,
    log_softmax,
    make_penalties,
    make_sampler,
)
from .template import generation_prompt_state, render_chat, thinking_enabled

PromptState = Literal["thinking", "answer", "open"]
FinishReason = Literal["stop", "length", "tool_calls", "abort"]

DEFAULT_PREFILL_STEP_SIZE = 2048

generation_stream = mx.new_thread_local_stream(mx.default_device())


# -- the model seam -------------------------------------------------------------------


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


# -- prompts ----------------------------------------------------------------------------


@dataclass
class Prompt:
    """A prompt ready for generation.

    state: where the output starts — "thinking" (the prompt opened a think block),
    "answer" (it pre-filled a closed one, enable_thinking=False) or "open" (the model
    decides: Qwen3 writes <think> itself). thinking: whether this reply is meant to think
    (False under enable_thinking=False or /no_think): picks the sampling defaults and
    whether a thinking budget applies.
    """

    tokens: list[int]
    text: str
    state: PromptState = "open"
    thinking: bool = True


def prepare_prompt(
    tokenizer: Any,
    prompt: str | list[int] | None = None,
    messages: list[Any] | None = None,
    *,
    tools: list[Any] | None = None,
    enable_thinking: bool = True,
) -> Prompt:
    """Render `messages` with the chat template (or take `prompt` as is) and tokenize."""
    if (prompt is None) == (messages is None):
        raise GenerationError("give either prompt or messages, not both/neither")
    if messages is not None:
        text = render_chat(
            messages,
            tools,
            enable_thinking=enable_thinking,
            chat_template=tokenizer.chat_template,
            **tokenizer.special_tokens_map,
        )
        tokens = tokenizer.encode(text)
        thinking = thinking_enabled(messages, default=enable_thinking)
    elif isinstance(prompt, str):
        if tools:
            raise GenerationError("tools: only with messages (a raw prompt is not templated)")
        text, tokens = prompt, tokenizer.encode(prompt)
        thinking = True
    else:
        tokens = [int(t) for t in prompt]
        text = tokenizer.decode(tokens)
        thinking = True
    if not tokens:
        raise GenerationError("prompt: empty (nothing to generate from)")
    state = generation_prompt_state(text)
    return Prompt(tokens, text, state, thinking and state != "answer")


@lru_cache(maxsize=16)
def _read_generation_config(path: str, mtime: float) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GenerationError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def generation_config(model_dir: str | Path | None) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} when there is none)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    return _read_generation_config(str(path), path.stat().st_mtime)


# -- the Sequence state machine -----------------------------------------------------------


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # best first


@dataclass
class SequenceOutput:
    """What one appended token produced. Deltas may be empty (held-back text)."""

    token: int
    text: str = ""  # raw text delta: think/tool markup included, stop strings removed
    reasoning: str = ""
    content: str = ""
    tool_calls: list[Delta] = field(default_factory=list)
    logprobs: TokenLogprob | None = None
    forced: bool = False  # forced by the thinking budget, not sampled
    finish_reason: FinishReason | None = None


class Sequence:
    """One request's generation state (see the module docstring for the engine contract)."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_tokens: list[int],
        params: SamplingParams,
        *,
        prompt_state: PromptState = "open",
        thinking_budget: int | None = None,
        parse_tools: bool = True,
        max_context: int | None = None,
        vocab_size: int | None = None,
    ):
        if params.temperature is None or params.max_tokens is None:
            raise GenerationError("Sequence needs resolved SamplingParams (call params.resolve())")
        if thinking_budget is not None and (
            isinstance(thinking_budget, bool)
            or not isinstance(thinking_budget, int)
            or thinking_budget < 0
        ):
            raise GenerationError(
                f"thinking_budget: expected an integer >= 0, got {thinking_budget!r}"
            )
        if vocab_size is not None:
            params.validate(vocab_size)
        self.tokenizer = tokenizer
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.max_tokens = params.max_tokens
        if max_context is not None:
            room = max_context - len(self.prompt_tokens)
            if room <= 0:
                raise GenerationError(
                    f"prompt: {len(self.prompt_tokens)} tokens, the model's context is {max_context}"
                )
            self.max_tokens = min(self.max_tokens, room)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None

        self.stop_ids = set(tokenizer.eos_token_ids) | set(params.stop_token_ids or [])
        self.stops = list(params.stop or [])
        self._held = ""  # text that might be the start of a stop string
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self._text: list[str] = []
        self.parser = OutputParser(in_reasoning=prompt_state == "thinking", parse_tools=parse_tools)

        # Thinking budget: count tokens inside the think block, then force it closed.
        self.thinking_budget = thinking_budget
        self.thinking_tokens = 0
        self._think_state: PromptState = prompt_state  # "open" → "thinking" → "answer"
        self._forced: list[int] = []
        self._check_budget()

        self.rng = RowRandom(params.seed)
        self.penalties: Penalties | None = make_penalties(
            params, vocab_size or _vocab_rows(tokenizer, params), self.prompt_tokens
        )

    @classmethod
    def from_prompt(
        cls,
        tokenizer: Any,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        thinking_budget: int | None = None,
        generation_config: dict[str, Any] | None = None,
        parse_tools: bool = True,
        max_context: int | None = None,
        vocab_size: int | None = None,
    ) -> Sequence:
        """Resolve `params` for this prompt (user > generation_config > Qwen3 defaults for
        thinking / non-thinking) and build the sequence. The budget is ignored when the
        reply doesn't think."""
        resolved = (params or SamplingParams()).resolve(
            thinking=prompt.thinking, generation_config=generation_config
        )
        return cls(
            tokenizer,
            prompt.tokens,
            resolved,
            prompt_state=prompt.state,
            thinking_budget=thinking_budget if prompt.thinking else None,
            parse_tools=parse_tools,
            max_context=max_context,
            vocab_size=vocab_size,
        )

    # -- engine hooks --------------------------------------------------------------------

    @property
    def forced_token(self) -> int | None:
        """Feed this instead of the sampled token (the thinking budget is closing the block)."""
        return self._forced[0] if self._forced else None

    @property
    def tokens_left(self) -> int:
        return 0 if self.finished else self.max_tokens - len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def observe(self, token: mx.array) -> None:
        """Tell the penalties a generated token is being fed to the model (lazy is fine)."""
        if self.penalties is not None:
            self.penalties.observe(token)

    def append(self, token: int, logprobs: TokenLogprob | None = None) -> SequenceOutput:
        """Add the next token (sampled, or `forced_token`); return what it produced."""
        if self.finished:
            raise GenerationError("append: the sequence has finished")
        forced = bool(self._forced) and token == self._forced[0]
        if forced:
            self._forced.pop(0)
            logprobs = None
        else:
            self._forced.clear()
        self.tokens.append(token)
        out = SequenceOutput(token, logprobs=logprobs, forced=forced)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if token in self.stop_ids:
            return self._finish("stop", out)
        delta = self._detokenizer.add_token(token)
        self._track_thinking(token, delta, forced)
        text, stopped = self._cut_at_stop(delta)
        self._emit(text, out)
        if stopped:
            return self._finish("stop", out, flush=False)
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length", out)
        return out

    def abort(self, reason: FinishReason = "abort") -> SequenceOutput:
        """Finish now (cancelled request, context full); flush held text and the parser."""
        out = SequenceOutput(self.tokens[-1] if self.tokens else -1)
        if self.finished:
            return out
        return self._finish(reason, out)

    # -- results -------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All text returned so far (raw: think and tool-call markup included)."""
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @property
    def reasoning(self) -> str:
        return self.parser.reasoning

    @property
    def content(self) -> str:
        return self.parser.content

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.parser.tool_calls

    # -- internals -----------------------------------------------------------------------

    def _track_thinking(self, token: int, delta: str, forced: bool) -> None:
        state = self._think_state
        if state == "open":
            if token == self.tokenizer.think_start_id:
                self._think_state = "thinking"
            elif delta.strip():
                self._think_state = "answer"
        elif state == "thinking":
            if token == self.tokenizer.think_end_id:
                self._think_state = "answer"
            elif not forced:
                self.thinking_tokens += 1
        self._check_budget()

    def _check_budget(self) -> None:
        if (
            self._think_state == "thinking"
            and self.thinking_budget is not None
            and self.thinking_tokens >= self.thinking_budget
            and not self._forced
        ):
            # Close the block the way Qwen3 writes one: "...\n</think>\n\n".
            newline = [] if self._detokenizer.text.endswith("\n") else self.tokenizer.encode("\n")
            self._forced = [*newline, self.tokenizer.think_end_id, *self.tokenizer.encode("\n\n")]

    def _cut_at_stop(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to return, whether a stop string was hit)."""
        if not self.stops:
            return delta, False
        text, self._held = self._held + delta, ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        hold = max(_overlap(text, s) for s in self.stops)
        if hold:
            text, self._held = text[:-hold], text[-hold:]
        return text, False

    def _emit(self, text: str, out: SequenceOutput) -> None:
        if not text:
            return
        self._text.append(text)
        out.text += text
        self._collect(self.parser.feed(text), out)

    @staticmethod
    def _collect(deltas: list[Delta], out: SequenceOutput) -> None:
        for d in deltas:
            if d.kind == "reasoning":
                out.reasoning += d.text
            elif d.kind == "content":
                out.content += d.text
            else:
                out.tool_calls.append(d)

    def _finish(
        self, reason: FinishReason, out: SequenceOutput, flush: bool = True
    ) -> SequenceOutput:
        if flush:
            text, _ = self._cut_at_stop(self._detokenizer.finalize(), final=True)
            self._emit(text, out)
        self._held = ""
        self._collect(self.parser.finish(), out)
        if reason == "stop" and self.parser.tool_calls:
            reason = "tool_calls"
        self.finish_reason = out.finish_reason = reason
        self._forced.clear()
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def _vocab_rows(tokenizer: Any, params: SamplingParams) -> int:
    # Penalty state needs the logits' width; only consulted when penalties are on.
    return max(tokenizer.vocab_size, max((int(k) for k in params.logit_bias or {}), default=0) + 1)


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
        return (
            f"Prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tps:.1f} tokens/s | "
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"TTFT: {self.time_to_first_token:.3f}s | Peak memory: {self.peak_memory:.3f} GB | "
            f"Finish: {self.finish_reason}"
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
    """Run `seq` to completion on `model`, one response per token.

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
    sampler = make_sampler(seq.params)
    want_logprobs = seq.params.logprobs or seq.params.top_logprobs > 0

    def sample(logits: mx.array):
        logits = apply_penalties(logits, [seq.penalties])
        logprobs = log_softmax(logits)
        keys = None if sampler.all_greedy else seq.rng.next_key()[None]
        token = share_tokens(model, sampler(logprobs, keys))  # --parallel: rank 0's token
        extra = gather_logprobs(logprobs, token, seq.params.top_logprobs) if want_logprobs else ()
        return token, extra

    def step(token: mx.array):
        seq.observe(token)
        return sample(forward(model, token[None], layers))

    with wired_limit(), mx.stream(generation_stream):
        token, extra = sample(prefill(model, seq.prompt_tokens[reused:], layers, prefill_step_size))
        mx.async_eval(token, extra)
        known_tokens.extend(seq.prompt_tokens[reused:])
        first_token_time = None
        while True:
            forced = seq.forced_token
            if forced is not None:
                token, extra = mx.array([forced], dtype=mx.uint32), ()
            fed = seq.tokens_left > 1
            if fed:  # queue the next step before reading this token: the device stays busy
                next_token, next_extra = step(token)
                mx.async_eval(next_token, next_extra)
            value = token.item()
            if fed:
                known_tokens.append(value)
            out = seq.append(value, _read_logprobs(value, extra))

            now = time.perf_counter()
            if first_token_time is None:
                first_token_time = now
                stats.prompt_time = now - start_time
                stats.time_to_first_token = now - start_time
            stats.generation_tokens = len(seq.tokens)
            stats.generation_time = now - first_token_time
            stats.peak_memory = mx.get_peak_memory() / 1e9
            stats.finish_reason = out.finish_reason
            yield GenerationResponse(
                text=out.text,
                token=value,
                reasoning=out.reasoning,
                content=out.content,
                tool_calls=out.tool_calls,
                logprobs=out.logprobs,
                finish_reason=out.finish_reason,
                stats=stats,
            )
            if seq.finished:
                break
            if len(seq.tokens) % 256 == 0:
                mx.clear_cache()
            token, extra = next_token, next_extra


def _read_logprobs(token: int, extra) -> TokenLogprob | None:
    if not extra:
        return None
    chosen, top_ids, top_values = extra
    top = []
    if top_ids is not None:
        top = list(zip(top_ids[0].tolist(), top_values[0].tolist(), strict=True))
    return TokenLogprob(token, chosen.item(), top)


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
    """
    start = time.perf_counter()
    seq, cache = start_request(model, tokenizer, prompt, messages, **kwargs)
    yield from stream_sequence(
        model, seq, cache, prefill_step_size=prefill_step_size, start_time=start
    )


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
    start = time.perf_counter()
    seq, cache = start_request(model, tokenizer, prompt, messages, **kwargs)
    stats = GenerationStats()
    for response in stream_sequence(
        model, seq, cache, prefill_step_size=prefill_step_size, start_time=start
    ):
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


# -- terminal -----------------------------------------------------------------------------------

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Prints a streamed reply like `ollama run`: thinking apart (dimmed on a terminal), then the answer."""

    def __init__(self, stream=None, color: bool | None = None, show_thinking: bool = True):
        self.out = stream or sys.stdout
        if color is None:
            color = self.out.isatty() and "NO_COLOR" not in os.environ
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.show_thinking = show_thinking
        self.thinking = False
        self.wrote_answer = False

    def feed(self, r: GenerationResponse) -> None:
        if r.reasoning and self.show_thinking:
            if not self.thinking:
                self.thinking = True
                self.out.write(f"{self.dim}Thinking...\n")
            self.out.write(r.reasoning)
        if r.content or r.tool_calls:
            self._end_thinking()
            self.out.write(r.content)
            for call in r.tool_calls:
                if call.name:
                    self.out.write(f"\n[tool call] {call.name} ")
                self.out.write(call.arguments_delta)
            self.wrote_answer = True
        self.out.flush()

    def _end_thinking(self) -> None:
        if self.thinking:
            self.out.write(f"\n...done thinking.{self.reset}\n\n")
            self.thinking = False

    def close(self) -> None:
        if self.thinking:
            self.out.write(self.reset)
            self.thinking = False
        self.out.write("\n")
        self.out.flush()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", help="model directory or hub id (default: the built-in demo model)"
    )
    parser.add_argument(
        "--long-context", action="store_true", help="YaRN to 131,072 tokens (factor 4)"
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset: generation_config.json, then Qwen3's defaults)")
    g.add_argument("--max-tokens", type=int, help="generated tokens at most")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--repetition-context-size", type=int)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--thinking-budget", type=int, help="close the think block after N tokens")
    g.add_argument("--no-think", action="store_true", help="answer without thinking")
    c = parser.add_argument_group("KV cache")
    c.add_argument("--kv-bits", type=int, help="quantize the KV cache to 4 or 8 bits")
    c.add_argument("--kv-group-size", type=int, default=64)
    c.add_argument("--max-kv-size", type=int, help="bounded (rotating) KV cache of N tokens")


SAMPLING_FLAGS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "repetition_context_size", "presence_penalty", "frequency_penalty", "seed", "stop",
)  # fmt: skip


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    values = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    return SamplingParams.from_kwargs(**values)


def load_for_cli(args: argparse.Namespace):
    from .assets import resolve_model_argument
    from .loading import load

    if getattr(args, "parallel", None):  # under mlx.launch: this rank's shard
        from . import distributed

        path = resolve_model_argument(args.model)
        return distributed.load(path, args.parallel, long_context=args.long_context)
    model, tokenizer = load(resolve_model_argument(args.model), long_context=args.long_context)
    tokenizer.detokenizer()  # builds its byte table (~1 s) now, not during the first reply
    return model, tokenizer


def run_cli(main):
    """Call `main()`; user errors become one line on stderr and exit code 1."""
    try:
        return main()
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3_mlx.generate", description="Generate a reply with a Qwen3 model."
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt", "-p", default="Hello!", help="the user message ('-' reads stdin)"
    )
    parser.add_argument("--system", "-s", help="system prompt")
    parser.add_argument(
        "--raw", action="store_true", help="feed the prompt as is, without the chat template"
    )
    parser.add_argument("--hide-thinking", action="store_true", help="print only the answer")
    parser.add_argument("--verbose", "-v", action="store_true", help="print speed and memory stats")
    parser.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="KV cache file (.safetensors): its prefix is reused, and it is saved back after",
    )
    parser.add_argument(
        "--parallel",
        choices=["tensor", "expert", "pipeline"],
        help="under mlx.launch: split the model over the ranks (see qwen3_mlx.distributed)",
    )
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        params = sampling_from_args(args)
        prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n")
        model, tokenizer = load_for_cli(args)
        if args.raw:
            request = {"prompt": prompt_text}
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt_text})
            request = {"messages": messages, "enable_thinking": not args.no_think}
        request = share(model, request)  # --parallel: every rank runs rank 0's request
        model_id = str(getattr(tokenizer, "model_dir", args.model))
        cache = None
        if args.prompt_cache:
            if Path(args.prompt_cache).exists():
                cache = load_prompt_cache(args.prompt_cache, model, model_id=model_id)
            else:
                cache = PromptCache(
                    make_cache(model, args.kv_bits, args.kv_group_size, args.max_kv_size)
                )
        printer = ReplyPrinter(show_thinking=not args.hide_thinking)
        response = None
        for response in stream_generate(
            model,
            tokenizer,
            **request,
            thinking_budget=args.thinking_budget,
            params=params,
            cache=cache,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_size=args.max_kv_size,
        ):
            printer.feed(response)
        printer.close()
        if cache is not None:
            save_prompt_cache(args.prompt_cache, cache, model_id=model_id)
        if args.verbose and response is not None:
            print(response.stats.summary(), file=sys.stderr)
        return 0

    return run_cli(rank_main(run) if args.parallel else run)


if __name__ == "__main__":
    raise SystemExit(main())

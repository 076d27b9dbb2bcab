"""`Sequence`: one request's generation state, the same for the Python API and the server.

A Sequence never calls the model. It turns each token an engine feeds it into text deltas
(reasoning / content / tool calls), holds back text that may begin a stop string, tracks the
thinking phase and budget, gates a grammar constraint to the answer, and decides the finish
reason. `generation.step` drives a batch of them; see its docstring for the per-token contract.

Thinking budget: once `thinking_budget` tokens were generated inside the think block, the
sequence forces "\\n</think>\\n\\n" (what Qwen3's template writes after a think block).

Constrained output (a grammar from `server.constrain`): the whole completion is an optional
think block, then exactly the constrained part. Inside the think block the end of turn is
masked, so a reply can't end there; the block is bounded by the thinking budget (by default half
of `max_tokens`), then `</think>` is forced; after it, every token is masked to the grammar and
the end of turn is allowed only once the grammar is complete. Too few tokens end in "length".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

from ..errors import GenerationError
from ..parsing import Delta, OutputParser, ToolCall
from ..sampling import Penalties, RowRandom, SamplingParams, make_penalties
from .prompt import Prompt, PromptState

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


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
        constraint: Any | None = None,
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
        self.prompt_state = prompt_state
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
        self.stop_string: str | None = None  # the stop string that ended the sequence
        self._held = ""  # text that might be the start of a stop string
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self._text: list[str] = []
        self.parser = OutputParser(in_reasoning=prompt_state == "thinking", parse_tools=parse_tools)

        # A grammar (server.constrain.Constraint) for the answer; see the module docstring.
        self.constraint = constraint
        if constraint is not None and thinking_budget is None and prompt_state != "answer":
            thinking_budget = self.max_tokens // 2

        # Thinking budget: count tokens inside the think block, then force it closed.
        self.thinking_budget = thinking_budget
        self.thinking_tokens = 0
        self._think_state: PromptState = prompt_state  # "open" → "thinking" → "answer"
        self._forced: list[int] = []
        self._check_budget()

        # MLX state (random keys, penalty counts) is made on first use, on the thread that runs
        # the model: a lazy array made on another thread can't be evaluated there.
        self._vocab_size = vocab_size
        self._rng: RowRandom | None = None
        self._penalties: Penalties | None | bool = params.has_penalties
        self.want_logprobs = bool(params.logprobs or params.top_logprobs)
        self.top_logprobs = int(params.top_logprobs or 0)

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
        constraint: Any | None = None,
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
            constraint=constraint,
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

    @property
    def rng(self) -> RowRandom:
        if self._rng is None:
            self._rng = RowRandom(self.params.seed)
        return self._rng

    @property
    def penalties(self) -> Penalties | None:
        if self._penalties is True:
            vocab = self._vocab_size or _vocab_rows(self.tokenizer, self.params)
            self._penalties = make_penalties(self.params, vocab, self.prompt_tokens)
        return self._penalties or None

    @property
    def phase(self) -> PromptState:
        """ "open" (the reply may start a think block), "thinking" or "answer"."""
        return self._think_state

    @property
    def constraint_failed(self) -> bool:
        """The grammar can no longer be satisfied (cannot happen while its masks apply)."""
        return self.constraint is not None and self.constraint.failed

    def mask(self, logits: mx.array) -> mx.array:
        """This row's (1, V) logits with what the constraint forbids now masked out."""
        if self._think_state == "thinking":
            # The reply must leave the think block before it may end.
            ids = mx.array(sorted(i for i in self.stop_ids if i < logits.shape[-1]))
            return logits.at[:, ids].add(-mx.inf) if ids.size else logits
        also = (self.tokenizer.think_start_id,) if self._think_state == "open" else ()
        return self.constraint.apply(logits, also)

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
        if self.constraint is not None and self._think_state != "thinking":
            if token != self.tokenizer.think_start_id:
                self.constraint.consume(token)
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
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            # The earliest match ends the text; Anthropic's API reports which string it was.
            at, self.stop_string = min(hits, key=lambda hit: hit[0])
            return text[:at], True
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

"""What every API's reply shares: SSE framing, dumping, the finish reason, usage, token texts, and
how a reply shows the model's thinking (`--reasoning-format` / `reasoning_format`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from ...parsing import THINK_END, THINK_START
from ..jobs import Finished
from ..protocol import (
    ChatLogprob,
    ChatLogprobTop,
    CompletionTokensDetails,
    PromptTokensDetails,
    Schema,
    Usage,
)


def sse(data: Any, event: str | None = None) -> str:
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def dump(model: Schema, *, exclude_none: bool = True) -> dict[str, Any]:
    """A reply object as JSON data: chat and completions leave unset (None) fields out; the
    Responses API writes them as null (its objects have a fixed shape)."""
    return model.model_dump(exclude_none=exclude_none, by_alias=True)


def chunk_sse(chunk: Schema) -> str:
    """A streamed chat/completion chunk as an SSE event; its choices keep `finish_reason: null`
    (clients read the key on every chunk), which dump() would drop with the other unset fields."""
    data = dump(chunk)
    for choice in data.get("choices", ()):
        choice.setdefault("finish_reason", None)
    return sse(data)


FinishReason = Literal["stop", "length", "tool_calls"]


def finish_reason(f: Finished) -> FinishReason:
    """The one mapping from the engine's finish reason (decided by `generation.Sequence`: "stop",
    "length", "tool_calls" when the stopped reply made tool calls) to the APIs' vocabulary.
    Completions never parse tool calls, so they only ever see "stop" and "length"."""
    if f.finish_reason in ("length", "tool_calls"):
        return f.finish_reason
    return "stop"


def usage_of(finished: Sequence[Finished], leaders: Sequence[int] = (0,)) -> Usage:
    """Usage summed over a request's rows; the prompt of `n` choices counts once (OpenAI's way):
    prompt figures come from `leaders`, the first row of each distinct prompt."""
    prompt = sum(finished[i].prompt_tokens for i in leaders)
    completion = sum(f.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(finished[i].cached_tokens for i in leaders)
        ),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(f.reasoning_tokens for f in finished),
            accepted_prediction_tokens=sum(f.accepted_draft_tokens for f in finished),
            rejected_prediction_tokens=sum(f.rejected_draft_tokens for f in finished),
        ),
    )


class TokenText:
    """Token id → the text and bytes logprobs report for it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    def chat_logprobs(self, items) -> list[ChatLogprob]:
        out = []
        for lp in items:
            text, raw = self(lp.token)
            top = [ChatLogprobTop(token=self(t)[0], logprob=v, bytes=self(t)[1]) for t, v in lp.top]
            out.append(ChatLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top))
        return out


# -- reasoning format ---------------------------------------------------------------------------

ReasoningFormat = Literal["separate", "raw"]
# llama.cpp's names too: "deepseek" (and its "auto") put the thinking apart, "none" leaves it in.
REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "separate": "separate",
    "deepseek": "separate",
    "auto": "separate",
    "raw": "raw",
    "none": "raw",
}


def reasoning_format(requested: str | None, default: str) -> ReasoningFormat:
    return REASONING_FORMATS[requested or default]


class Thinking:
    """How one choice shows the model's thinking, step by step: `(reasoning, content)` deltas.

    "separate": as the parser split them. "raw": no reasoning; the think block stays in the
    content, written the way Qwen3 writes it (`<think>\\n…\\n</think>\\n\\n`, also when the prompt
    opened the block), then the answer. Tool calls are parsed out of the answer either way.
    """

    def __init__(self, fmt: ReasoningFormat, prompt_state: str):
        self.raw = fmt == "raw"
        # "open": a think block may start; "thinking": inside it; "answer": past it.
        self.state = {"thinking": "opened", "answer": "answer"}.get(prompt_state, "open")
        self.tail = ""  # the raw text's end: a tag may come in pieces

    def __call__(self, step) -> tuple[str, str]:
        if not self.raw:
            return step.reasoning, step.content
        parts = []
        answering = bool(step.content or step.tool_calls)
        text, self.tail = self.tail + step.text, (self.tail + step.text)[-len(THINK_END) :]
        if self.state == "opened" or (
            self.state == "open" and (step.reasoning or THINK_START in text)
        ):
            parts.append(THINK_START + "\n")
            self.state = "thinking"
        elif self.state == "open" and answering:
            self.state = "answer"
        parts.append(step.reasoning)
        if self.state == "thinking" and (THINK_END in text or answering):
            parts.append("\n" + THINK_END + "\n\n")
            self.state = "answer"
        parts.append(step.content)
        return "", "".join(parts)

"""`/v1/chat/completions` replies: a whole `chat.completion`, or `chat.completion.chunk` SSE lines.

Each choice (a row of the batch) shows its thinking per `Thinking` (`reasoning_content`, and LM
Studio's `reasoning`, or inside `content` in raw format); tool calls come as OpenAI's, in a
stream with `id`, `type` and `name` once (with `arguments: ""`) and the argument text following
under the same `index`. With `n` > 1 every chunk names its choice's `index`; the usage chunk (only
with `stream_options.include_usage`) comes last, with `choices: []`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..jobs import Finished
from ..models import LoadedModel
from ..protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprob,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
)
from .common import Thinking, TokenText, chunk_sse, dump, finish_reason, sse, usage_of
from .lmstudio import extras, stats_of


class _Choice:
    """One choice's reply as it accumulates."""

    def __init__(self, thinking: Thinking, want_logprobs: bool):
        self.thinking = thinking
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[ChatLogprob] | None = [] if want_logprobs else None

    def message(self) -> ResponseMessage:
        reasoning = "".join(self.reasoning) or None
        calls = [
            ResponseToolCall(
                index=i,
                id=c["id"],
                type="function",
                function=ResponseFunctionCall(name=c["name"], arguments=c["arguments"] or "{}"),
            )
            for i, c in sorted(self.calls.items())
        ]
        content = "".join(self.content)
        return ResponseMessage(
            content=content if content or not calls else None,
            reasoning_content=reasoning,
            reasoning=reasoning,
            tool_calls=calls or None,
        )


class ChatCollector:
    """A whole chat completion (not streamed), from its choices' step outputs."""

    def __init__(self, model: LoadedModel, thinking: Sequence[Thinking], want_logprobs: bool):
        self.choices = [_Choice(t, want_logprobs) for t in thinking]
        self.tokens = TokenText(model.tokenizer)

    def add(self, index: int, step) -> None:
        choice = self.choices[index]
        reasoning, content = choice.thinking(step)
        if reasoning:
            choice.reasoning.append(reasoning)
        if content:
            choice.content.append(content)
        for d in step.tool_calls:
            call = choice.calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["arguments"] += d.arguments_delta
        if choice.logprobs is not None and step.logprobs is not None:
            choice.logprobs.extend(self.tokens.chat_logprobs([step.logprobs]))

    def response(
        self,
        *,
        id: str,
        created: int,
        model: LoadedModel,
        finished: Sequence[Finished],
        lmstudio: bool,
    ) -> dict[str, Any]:
        choices = [
            ChatChoice(
                index=i,
                message=c.message(),
                logprobs=None if c.logprobs is None else ChoiceLogprobs(content=c.logprobs),
                finish_reason=finish_reason(f),
            )
            for i, (c, f) in enumerate(zip(self.choices, finished, strict=True))
        ]
        reply = ChatCompletion(
            id=id,
            created=created,
            model=model.id,
            choices=choices,
            usage=usage_of(finished),
            **extras(model, finished, lmstudio),
        )
        return dump(reply)


class ChatStreamer:
    """Turns the choices' step outputs into `chat.completion.chunk` SSE lines."""

    def __init__(
        self,
        *,
        id: str,
        created: int,
        model: LoadedModel,
        thinking: Sequence[Thinking],
        include_usage: bool,
        lmstudio: bool,
        want_logprobs: bool,
    ):
        self.id, self.created, self.model = id, created, model
        self.thinking = list(thinking)
        self.include_usage = include_usage
        self.lmstudio = lmstudio
        self.want_logprobs = want_logprobs
        self.tokens = TokenText(model.tokenizer)

    def _chunk(self, index: int | None, delta: ChunkDelta | None = None, **fields) -> str:
        """A chunk for choice `index` (None: the usage chunk, no choices)."""
        extra = {k: fields.pop(k) for k in ("usage", "stats") if k in fields}
        choices = [] if index is None else [ChunkChoice(index=index, delta=delta, **fields)]
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model.id, choices=choices, **extra
        )
        return chunk_sse(chunk)

    def start(self) -> list[str]:
        return [
            self._chunk(i, ChunkDelta(role="assistant", content=""))
            for i in range(len(self.thinking))
        ]

    def step(self, index: int, step) -> list[str]:
        logprobs = None
        if self.want_logprobs and step.logprobs is not None:
            logprobs = ChoiceLogprobs(content=self.tokens.chat_logprobs([step.logprobs]))
        reasoning, content = self.thinking[index](step)
        deltas: list[ChunkDelta] = []
        if reasoning:
            deltas.append(ChunkDelta(reasoning_content=reasoning, reasoning=reasoning))
        if content:
            deltas.append(ChunkDelta(content=content))
        for d in step.tool_calls:
            if d.id is not None or d.name is not None:
                header = ResponseToolCall(
                    index=d.index,
                    id=d.id,
                    type="function",
                    function=ResponseFunctionCall(name=d.name, arguments=""),
                )
                deltas.append(ChunkDelta(tool_calls=[header]))
            if d.arguments_delta:
                fragment = ResponseToolCall(
                    index=d.index, function=ResponseFunctionCall(arguments=d.arguments_delta)
                )
                deltas.append(ChunkDelta(tool_calls=[fragment]))
        if not deltas and logprobs is not None:
            deltas.append(ChunkDelta(content=""))
        return [
            self._chunk(index, d, logprobs=logprobs if i == 0 else None)
            for i, d in enumerate(deltas)
        ]

    def finish(self, index: int, finished: Finished) -> list[str]:
        stats = stats_of([finished]) if self.lmstudio else None
        return [
            self._chunk(index, ChunkDelta(), finish_reason=finish_reason(finished), stats=stats)
        ]

    def end(self, finished: Sequence[Finished]) -> list[str]:
        out = [self._chunk(None, usage=usage_of(finished))] if self.include_usage else []
        return out + [sse("[DONE]")]

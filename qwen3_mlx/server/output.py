"""Engine events → OpenAI / LM Studio JSON: whole responses, SSE chunks, Responses-API events.

The engine sends one `Output` per decode step (a `generate.SequenceOutput`: reasoning, content
and tool-call deltas) and one `Finished` at the end. Here those become what OpenAI's SDK expects:

- chat chunks carry `reasoning_content` (and LM Studio's `reasoning`), `content`, and tool calls
  whose `id`, `type` and `name` come once (with `arguments: ""`) and whose argument text follows
  in fragments under the same `index`;
- the usage chunk (only with `stream_options.include_usage`) has `choices: []`;
- `/api/v0` responses add LM Studio's `stats`, `model_info` and `runtime`.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .jobs import Finished
from .models import LoadedModel
from .protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprob,
    ChatLogprobTop,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionTokensDetails,
    ModelInfo,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    Runtime,
    Stats,
    Usage,
)

try:
    RUNTIME_VERSION = version("qwen3-mlx")
except PackageNotFoundError:  # running from a source tree
    RUNTIME_VERSION = "0.1.0"


def sse(data: Any, event: str | None = None) -> str:
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def dump(model) -> dict[str, Any]:
    return model.model_dump(exclude_none=True, by_alias=True)


def chunk_sse(chunk) -> str:
    """A streamed chunk as an SSE event; its choice keeps `finish_reason: null` (clients read
    the key on every chunk), which dump() would drop with the other unset fields."""
    data = dump(chunk)
    if data.get("choices"):
        data["choices"][0].setdefault("finish_reason", None)
    return sse(data)


def usage_of(f: Finished) -> Usage:
    return Usage(
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        total_tokens=f.prompt_tokens + f.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=f.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=f.reasoning_tokens),
    )


def stats_of(f: Finished) -> Stats:
    decoded = max(f.completion_tokens - 1, 0)  # the first token's time is the prompt's
    tps = decoded / f.generation_time if decoded and f.generation_time > 0 else 0.0
    return Stats(
        tokens_per_second=round(tps, 3),
        time_to_first_token=round(f.time_to_first_token, 4),
        generation_time=round(f.generation_time, 4),
        stop_reason=f.stop_reason,
    )


def model_info_of(model: LoadedModel) -> ModelInfo:
    return ModelInfo(arch=model.arch, quant=model.quantization, context_length=model.context_length)


def runtime() -> Runtime:
    return Runtime(version=RUNTIME_VERSION)


def finish_reason_of(f: Finished, tool_calls: bool) -> str:
    if f.finish_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


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


# -- chat ---------------------------------------------------------------------------------------


class ChatCollector:
    """Accumulates a whole chat reply from the engine's step outputs (non-streaming)."""

    def __init__(self, model: LoadedModel, want_logprobs: bool):
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[ChatLogprob] | None = [] if want_logprobs else None
        self.tokens = TokenText(model.tokenizer)

    def add(self, step) -> None:
        if step.reasoning:
            self.reasoning.append(step.reasoning)
        if step.content:
            self.content.append(step.content)
        for d in step.tool_calls:
            call = self.calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["arguments"] += d.arguments_delta
        if self.logprobs is not None and step.logprobs is not None:
            self.logprobs.extend(self.tokens.chat_logprobs([step.logprobs]))

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

    def response(
        self, *, id: str, created: int, model: LoadedModel, finished: Finished, lmstudio: bool
    ) -> ChatCompletion:
        message = self.message()
        return ChatCompletion(
            id=id,
            created=created,
            model=model.id,
            choices=[
                ChatChoice(
                    message=message,
                    logprobs=ChoiceLogprobs(content=self.logprobs)
                    if self.logprobs is not None
                    else None,
                    finish_reason=finish_reason_of(finished, bool(message.tool_calls)),
                )
            ],
            usage=usage_of(finished),
            stats=stats_of(finished) if lmstudio else None,
            model_info=model_info_of(model) if lmstudio else None,
            runtime=runtime() if lmstudio else None,
        )


class ChatStreamer:
    """Turns step outputs into `chat.completion.chunk` SSE lines."""

    def __init__(
        self,
        *,
        id: str,
        created: int,
        model: LoadedModel,
        include_usage: bool,
        lmstudio: bool,
        want_logprobs: bool,
    ):
        self.id, self.created, self.model = id, created, model
        self.include_usage = include_usage
        self.lmstudio = lmstudio
        self.want_logprobs = want_logprobs
        self.tokens = TokenText(model.tokenizer)
        self.saw_tool_call = False

    def _chunk(
        self,
        delta: ChunkDelta,
        *,
        finish_reason=None,
        logprobs=None,
        usage=None,
        stats=None,
        choices=True,
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model.id,
            choices=[ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)]
            if choices
            else [],
            usage=usage,
            stats=stats,
        )
        return chunk_sse(chunk)

    def start(self) -> str:
        return self._chunk(ChunkDelta(role="assistant", content=""))

    def step(self, step) -> list[str]:
        logprobs = None
        if self.want_logprobs and step.logprobs is not None:
            logprobs = ChoiceLogprobs(content=self.tokens.chat_logprobs([step.logprobs]))
        deltas: list[ChunkDelta] = []
        if step.reasoning:
            deltas.append(ChunkDelta(reasoning_content=step.reasoning, reasoning=step.reasoning))
        if step.content:
            deltas.append(ChunkDelta(content=step.content))
        for d in step.tool_calls:
            self.saw_tool_call = True
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
        return [self._chunk(d, logprobs=logprobs if i == 0 else None) for i, d in enumerate(deltas)]

    def finish(self, finished: Finished) -> list[str]:
        reason = finish_reason_of(finished, self.saw_tool_call)
        stats = stats_of(finished) if self.lmstudio else None
        out = [self._chunk(ChunkDelta(), finish_reason=reason, stats=stats)]
        if self.include_usage:
            out.append(self._chunk(ChunkDelta(), usage=usage_of(finished), choices=False))
        out.append(sse("[DONE]"))
        return out


# -- text completions ----------------------------------------------------------------------------


class CompletionCollector:
    def __init__(self, model: LoadedModel, want_logprobs: bool, top_n: int):
        self.text: list[str] = []
        self.tokens = TokenText(model.tokenizer)
        self.logprobs = (
            CompletionLogprobs(top_logprobs=[] if top_n else None) if want_logprobs else None
        )
        self.offset = 0

    def add(self, step) -> CompletionLogprobs | None:
        """Append a step; return this step's logprobs (for streaming)."""
        self.text.append(step.text)
        if self.logprobs is None or step.logprobs is None:
            self.offset += len(step.text)
            return None
        lp = step.logprobs
        piece = CompletionLogprobs(
            tokens=[self.tokens(lp.token)[0]],
            token_logprobs=[lp.logprob],
            top_logprobs=[{self.tokens(t)[0]: v for t, v in lp.top}]
            if self.logprobs.top_logprobs is not None
            else None,
            text_offset=[self.offset],
        )
        self.offset += len(step.text)
        self.logprobs.tokens += piece.tokens
        self.logprobs.token_logprobs += piece.token_logprobs
        self.logprobs.text_offset += piece.text_offset
        if piece.top_logprobs is not None:
            self.logprobs.top_logprobs += piece.top_logprobs
        return piece


def completion_finish(f: Finished) -> str:
    return "length" if f.finish_reason == "length" else "stop"


def completion_response(
    *,
    id: str,
    created: int,
    model: LoadedModel,
    text: str,
    logprobs: CompletionLogprobs | None,
    finished: Finished,
    lmstudio: bool,
) -> Completion:
    return Completion(
        id=id,
        created=created,
        model=model.id,
        choices=[
            CompletionChoice(
                text=text, logprobs=logprobs, finish_reason=completion_finish(finished)
            )
        ],
        usage=usage_of(finished),
        stats=stats_of(finished) if lmstudio else None,
        model_info=model_info_of(model) if lmstudio else None,
        runtime=runtime() if lmstudio else None,
    )


def completion_chunk(
    *,
    id: str,
    created: int,
    model: LoadedModel,
    text: str,
    logprobs=None,
    finish_reason=None,
    usage=None,
    stats=None,
    choices=True,
) -> str:
    chunk = Completion(
        id=id,
        created=created,
        model=model.id,
        choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)]
        if choices
        else [],
        usage=usage,
        stats=stats,
    )
    return chunk_sse(chunk)


# -- Responses API --------------------------------------------------------------------------------


class ResponsesBuilder:
    """Builds a `/v1/responses` result and, when streaming, its typed events as they happen.

    Output items open in order: a reasoning item (if the model thought), a message item (if it
    answered), then one function_call item per tool call. Each item is announced
    (`output_item.added`), filled by deltas and closed (`output_item.done`) before the next one.
    """

    def __init__(self, *, id: str, created: int, model: LoadedModel, request: dict[str, Any]):
        self.id, self.created, self.model = id, created, model
        self.request = request
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.seq = 0
        self.calls: dict[int, dict[str, Any]] = {}

    # events
    def _event(self, type: str, **fields) -> str:
        self.seq += 1
        return sse({"type": type, "sequence_number": self.seq, **fields}, event=type)

    def snapshot(
        self, status: str, usage: dict | None = None, finished: Finished | None = None
    ) -> dict:
        text = "".join(
            part["text"]
            for item in self.output
            if item["type"] == "message"
            for part in item["content"]
        )
        incomplete = None
        if finished is not None and finished.finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model.id,
            "output": list(self.output),
            "output_text": text,
            "incomplete_details": incomplete,
            "usage": usage,
            "error": None,
            **self.request,
        }

    def start(self) -> list[str]:
        response = self.snapshot("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.output)
        events = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events.append(
                self._event(
                    "response.reasoning_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=text,
                )
            )
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                )
            )
            events.append(
                self._event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        item["status"] = "completed"
        self.output.append(item)
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        return events

    def _open(self, item: dict[str, Any]) -> list[str]:
        events = self._close()
        self.open = item
        index = len(self.output)
        shown = (
            {**item, "content": []}
            if item["type"] != "function_call"
            else {**item, "arguments": ""}
        )
        events.append(self._event("response.output_item.added", output_index=index, item=shown))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def step(self, step) -> list[str]:
        events: list[str] = []
        index = lambda: len(self.output)  # noqa: E731 - the open item's index
        if step.reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                events += self._open(
                    {
                        "type": "reasoning",
                        "id": _item_id("rs"),
                        "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}],
                        "status": "in_progress",
                    }
                )
            self.open["content"][0]["text"] += step.reasoning
            events.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=self.open["id"],
                    output_index=index(),
                    content_index=0,
                    delta=step.reasoning,
                )
            )
        if step.content:
            if self.open is None or self.open["type"] != "message":
                events += self._open(
                    {
                        "type": "message",
                        "id": _item_id("msg"),
                        "role": "assistant",
                        "status": "in_progress",
                        "content": [{"type": "output_text", "text": "", "annotations": []}],
                    }
                )
            self.open["content"][0]["text"] += step.content
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self.open["id"],
                    output_index=index(),
                    content_index=0,
                    delta=step.content,
                    logprobs=[],
                )
            )
        for d in step.tool_calls:
            if d.id is not None or d.name is not None:
                item = {
                    "type": "function_call",
                    "id": _item_id("fc"),
                    "call_id": d.id,
                    "name": d.name,
                    "arguments": "",
                    "status": "in_progress",
                }
                events += self._open(item)
            if d.arguments_delta and self.open is not None and self.open["type"] == "function_call":
                self.open["arguments"] += d.arguments_delta
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.open["id"],
                        output_index=index(),
                        delta=d.arguments_delta,
                    )
                )
        return events

    def finish(self, finished: Finished) -> tuple[dict[str, Any], list[str]]:
        events = self._close()
        usage = {
            "input_tokens": finished.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens},
            "output_tokens": finished.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": finished.reasoning_tokens},
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        }
        response = self.snapshot("completed", usage, finished)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=response))
        return response, events


def _item_id(prefix: str) -> str:
    import uuid

    return f"{prefix}_{uuid.uuid4().hex}"

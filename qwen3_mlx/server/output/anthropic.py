"""`/v1/messages` replies (Anthropic's Messages API): the message, and when streaming its events.

Content blocks open in the order the model writes them: a thinking block (if it thought), a
text block (if it answered), a tool_use block per tool call. Streamed, the message is announced
empty (`message_start`, then a `ping`), each block is opened (`content_block_start`), filled by
deltas and closed (`content_block_stop`) before the next one opens; a thinking block gets its
signature (`signature_delta`) as its last delta. Then `message_delta` (stop reason, usage totals)
and `message_stop`. The whole message is built from the same steps, so both agree.
"""

from __future__ import annotations

import hashlib
import json

from ..jobs import EngineBusy, Finished
from ..models import LoadedModel
from ..prepare import ApiError
from ..protocol.anthropic import (
    AnthropicErrorDetail,
    AnthropicErrorResponse,
    AnthropicEvent,
    AnthropicMessage,
    AnthropicUsage,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ErrorEvent,
    InputJsonDelta,
    MessageDeltaBody,
    MessageDeltaEvent,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    SignatureDelta,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)
from .common import dump, finish_reason, sse

# HTTP status → Anthropic's error type (other 4xx are invalid requests, other 5xx api errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # the queue is full (Anthropic's own overload status is 529)
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str) -> dict:
    return dump(
        AnthropicErrorResponse(error=AnthropicErrorDetail(type=error_type(status), message=message))
    )


def error_event(e: ApiError | EngineBusy) -> str:
    """An error after the stream began: Anthropic's `error` event."""
    status, message = (503, str(e)) if isinstance(e, EngineBusy) else (e.status, e.message)
    event = ErrorEvent(error=AnthropicErrorDetail(type=error_type(status), message=message))
    return sse(dump(event), event="error")


def signature(thinking: str) -> str:
    """A thinking block's signature: stable for its text (clients echo it back; never checked)."""
    return "qwen3-mlx-" + hashlib.sha256(thinking.encode("utf-8")).hexdigest()


def tool_use_id(call_id: str) -> str:
    # Anthropic's ids read `toolu_…`; the parser's are OpenAI's `call_…`.
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(finished: Finished) -> tuple[StopReason, str | None]:
    """(stop_reason, the stop sequence that ended the reply, if one did)."""
    reason = finish_reason(finished)
    if reason == "length":
        return "max_tokens", None
    if reason == "tool_calls":
        return "tool_use", None
    if finished.stop_string is not None:
        return "stop_sequence", finished.stop_string
    return "end_turn", None


def usage(finished: Finished) -> AnthropicUsage:
    return AnthropicUsage(
        input_tokens=finished.prompt_tokens - finished.cached_tokens,
        output_tokens=finished.completion_tokens,
        cache_read_input_tokens=finished.cached_tokens,
    )


Block = TextBlock | ThinkingBlock | ToolUseBlock


class MessageBuilder:
    """`start`, then `step` per step output, then `finish`: the SSE lines when `streaming`, and
    the message (`message`). `show_thinking=False` (thinking `display: "omitted"`): thinking
    blocks carry their signature but no text."""

    def __init__(
        self,
        *,
        id: str,
        model: LoadedModel,
        prompt_tokens: int,
        streaming: bool,
        show_thinking: bool = True,
    ):
        self.id, self.model, self.prompt_tokens = id, model, prompt_tokens
        self.streaming, self.show_thinking = streaming, show_thinking
        self.content: list[Block] = []
        self.open: Block | None = None
        self.thought = ""  # the open thinking block's text, which its signature covers
        self.arguments = ""  # the open tool_use block's input JSON so far
        self.final: AnthropicMessage | None = None

    def _event(self, event: AnthropicEvent) -> list[str]:
        if not self.streaming:
            return []
        return [sse(dump(event, exclude_none=False), event=event.type)]

    def _delta(self, delta) -> list[str]:
        return self._event(ContentBlockDeltaEvent(index=len(self.content) - 1, delta=delta))

    def start(self) -> list[str]:
        # Before prefill nothing is known of the cache: the totals come in message_delta.
        empty = AnthropicMessage(
            id=self.id,
            model=self.model.id,
            usage=AnthropicUsage(input_tokens=self.prompt_tokens, output_tokens=0),
        )
        return [*self._event(MessageStartEvent(message=empty)), *self._event(PingEvent())]

    def _close(self) -> list[str]:
        block, self.open = self.open, None
        if block is None:
            return []
        events = []
        if isinstance(block, ThinkingBlock):
            block.signature = signature(self.thought)
            events += self._delta(SignatureDelta(signature=block.signature))
        elif isinstance(block, ToolUseBlock):
            block.input = json.loads(self.arguments or "{}")
        return events + self._event(ContentBlockStopEvent(index=len(self.content) - 1))

    def _open(self, block: Block) -> list[str]:
        events = self._close()
        self.content.append(block)
        self.open, self.thought, self.arguments = block, "", ""
        # Written at once, so the start shows the block empty, as it opens.
        return events + self._event(
            ContentBlockStartEvent(index=len(self.content) - 1, content_block=block)
        )

    def step(self, step) -> list[str]:
        events: list[str] = []
        if step.reasoning:
            if not isinstance(self.open, ThinkingBlock):
                events += self._open(ThinkingBlock())
            self.thought += step.reasoning
            if self.show_thinking:
                self.open.thinking += step.reasoning
                events += self._delta(ThinkingDelta(thinking=step.reasoning))
        if step.content:
            if not isinstance(self.open, TextBlock):
                events += self._open(TextBlock())
            self.open.text += step.content
            events += self._delta(TextDelta(text=step.content))
        for d in step.tool_calls:
            if d.id is not None or d.name is not None:
                events += self._open(ToolUseBlock(id=tool_use_id(d.id or ""), name=d.name or ""))
            if d.arguments_delta and isinstance(self.open, ToolUseBlock):
                self.arguments += d.arguments_delta
                events += self._delta(InputJsonDelta(partial_json=d.arguments_delta))
        return events

    def finish(self, finished: Finished) -> list[str]:
        """The closing events; afterwards `message` is the whole reply."""
        events = self._close()
        reason, sequence = stop_reason(finished)
        totals = usage(finished)
        self.final = AnthropicMessage(
            id=self.id,
            model=self.model.id,
            content=self.content,
            stop_reason=reason,
            stop_sequence=sequence,
            usage=totals,
        )
        body = MessageDeltaBody(stop_reason=reason, stop_sequence=sequence)
        events += self._event(MessageDeltaEvent(delta=body, usage=totals))
        return events + self._event(MessageStopEvent())

    def message(self) -> dict:
        return dump(self.final, exclude_none=False)

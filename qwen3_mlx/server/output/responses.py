"""`/v1/responses` results and, when streaming, their typed events as they happen.

Output items open in order: a reasoning item (if the model thought), a message item (if it
answered), then one function_call item per tool call. Each item is announced
(`output_item.added`), filled by deltas and closed (`output_item.done`) before the next one.
Responses objects have a fixed shape: unset fields are written as null (`dump(exclude_none=False)`).
"""

from __future__ import annotations

import uuid
from typing import Any

from ..jobs import Finished
from ..models import LoadedModel
from ..protocol import (
    CompletionTokensDetails,
    PromptTokensDetails,
    ResponseArgumentsDelta,
    ResponseArgumentsDone,
    ResponseFunctionCallOutput,
    ResponseItemEvent,
    ResponseLifecycleEvent,
    ResponseMessageOutput,
    ResponseObject,
    ResponseOutputItem,
    ResponseOutputText,
    ResponsePartEvent,
    ResponseReasoningDelta,
    ResponseReasoningDone,
    ResponseReasoningOutput,
    ResponsesEvent,
    ResponsesUsage,
    ResponseTextDelta,
    ResponseTextDone,
)
from .common import dump, finish_reason, sse


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesBuilder:
    """`start`, then `step` per step output, then `finish`: SSE events, and the final object."""

    def __init__(self, *, id: str, created: int, model: LoadedModel, request: dict[str, Any]):
        self.id, self.created, self.model = id, created, model
        self.request = request  # what the result echoes of the request (instructions, tools, ...)
        self.output: list[ResponseOutputItem] = []
        self.open: ResponseOutputItem | None = None
        self.seq = 0

    def _event(self, event: type[ResponsesEvent], type: str, **fields) -> str:
        self.seq += 1
        data = dump(event(type=type, sequence_number=self.seq, **fields), exclude_none=False)
        return sse(data, event=type)

    def snapshot(self, status: str, finished: Finished | None = None) -> ResponseObject:
        text = "".join(
            part.text
            for item in self.output
            if isinstance(item, ResponseMessageOutput)
            for part in item.content
        )
        incomplete = usage = None
        if finished is not None:
            usage = ResponsesUsage(
                input_tokens=finished.prompt_tokens,
                input_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
                output_tokens=finished.completion_tokens,
                output_tokens_details=CompletionTokensDetails(
                    reasoning_tokens=finished.reasoning_tokens
                ),
                total_tokens=finished.prompt_tokens + finished.completion_tokens,
            )
            if finish_reason(finished) == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return ResponseObject(
            id=self.id,
            created_at=self.created,
            status=status,
            model=self.model.id,
            output=[dump(item, exclude_none=False) for item in self.output],
            output_text=text,
            incomplete_details=incomplete,
            usage=usage,
            error=None,
            **self.request,
        )

    def start(self) -> list[str]:
        response = self.snapshot("in_progress")
        return [
            self._event(ResponseLifecycleEvent, "response.created", response=response),
            self._event(ResponseLifecycleEvent, "response.in_progress", response=response),
        ]

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"item_id": item.id, "output_index": len(self.output)}
        events = []
        if isinstance(item, ResponseReasoningOutput):
            text = item.content[0].text
            events.append(
                self._event(ResponseReasoningDone, "response.reasoning_text.done", text=text, **at)
            )
        elif isinstance(item, ResponseMessageOutput):
            part = item.content[0]
            events += [
                self._event(ResponseTextDone, "response.output_text.done", text=part.text, **at),
                self._event(ResponsePartEvent, "response.content_part.done", part=part, **at),
            ]
        else:
            events.append(
                self._event(
                    ResponseArgumentsDone,
                    "response.function_call_arguments.done",
                    arguments=item.arguments,
                    **at,
                )
            )
        item.status = "completed"
        self.output.append(item)
        index = at["output_index"]
        done = self._event(
            ResponseItemEvent, "response.output_item.done", output_index=index, item=item
        )
        events.append(done)
        return events

    def _open(self, item: ResponseOutputItem) -> list[str]:
        events = self._close()
        self.open = item
        index = len(self.output)
        if isinstance(item, ResponseFunctionCallOutput):
            shown = item.model_copy(update={"arguments": ""})
        else:
            shown = item.model_copy(update={"content": []})
        events.append(
            self._event(
                ResponseItemEvent, "response.output_item.added", output_index=index, item=shown
            )
        )
        if isinstance(item, ResponseMessageOutput):
            events.append(
                self._event(
                    ResponsePartEvent,
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=index,
                    part=ResponseOutputText(),
                )
            )
        return events

    def step(self, step) -> list[str]:
        events: list[str] = []
        if step.reasoning:
            if not isinstance(self.open, ResponseReasoningOutput):
                events += self._open(ResponseReasoningOutput(id=_item_id("rs")))
            self.open.content[0].text += step.reasoning
            events.append(
                self._event(
                    ResponseReasoningDelta,
                    "response.reasoning_text.delta",
                    item_id=self.open.id,
                    output_index=len(self.output),
                    delta=step.reasoning,
                )
            )
        if step.content:
            if not isinstance(self.open, ResponseMessageOutput):
                events += self._open(ResponseMessageOutput(id=_item_id("msg")))
            self.open.content[0].text += step.content
            events.append(
                self._event(
                    ResponseTextDelta,
                    "response.output_text.delta",
                    item_id=self.open.id,
                    output_index=len(self.output),
                    delta=step.content,
                )
            )
        for d in step.tool_calls:
            if d.id is not None or d.name is not None:
                item = ResponseFunctionCallOutput(id=_item_id("fc"), call_id=d.id, name=d.name)
                events += self._open(item)
            if d.arguments_delta and isinstance(self.open, ResponseFunctionCallOutput):
                self.open.arguments += d.arguments_delta
                events.append(
                    self._event(
                        ResponseArgumentsDelta,
                        "response.function_call_arguments.delta",
                        item_id=self.open.id,
                        output_index=len(self.output),
                        delta=d.arguments_delta,
                    )
                )
        return events

    def finish(self, finished: Finished) -> tuple[dict[str, Any], list[str]]:
        """(the result as JSON data, the closing events)."""
        events = self._close()
        response = self.snapshot("completed", finished)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        events.append(self._event(ResponseLifecycleEvent, kind, response=response))
        return dump(response, exclude_none=False), events

"""LM Studio's `/api/v1` replies: the chat result, its streamed events, the model list.

A chat's output is its items in the order the model wrote them: a `reasoning` item (if it
thought), then a `message` item. Streamed, the events are `chat.start`, `model_load.start` /
`model_load.end` (when the request loaded the model: the stream opens once the model is loaded,
so both come at once, the second with the load's time), `prompt_processing.start`,
`prompt_processing.end` (with the first output), each item's `<item>.start`, `<item>.delta`s and
`<item>.end`, and `chat.end` with the whole result, which the non-streamed reply is. An error
after the stream began is an `error` event (and no `chat.end`). A tool call the server ran
(`integrations`, mcp_loop.py) is a `tool_call` item between them, streamed as LM Studio does:
`tool_call.start`, `tool_call.arguments`, then `tool_call.success` or `tool_call.failure`.
"""

from __future__ import annotations

from ..catalog import CatalogEntry
from ..jobs import EngineBusy, Finished
from ..models import LoadedModel
from ..prepare import ApiError
from ..protocol.lmstudio_v1 import (
    REASONING_OPTIONS,
    V1Capabilities,
    V1ChatEnd,
    V1ChatResponse,
    V1ChatStart,
    V1Delta,
    V1ErrorDetail,
    V1ErrorEvent,
    V1InstanceConfig,
    V1LoadedInstance,
    V1Marker,
    V1MessageOutput,
    V1Model,
    V1ModelLoadEnd,
    V1ModelLoadStart,
    V1ProviderInfo,
    V1Quantization,
    V1ReasoningOptions,
    V1ReasoningOutput,
    V1Stats,
    V1ToolCallArguments,
    V1ToolCallFailure,
    V1ToolCallOutput,
    V1ToolCallStart,
    V1ToolCallSuccess,
)
from ..protocol.mcp import McpCall
from .common import dump, sse
from .lmstudio import stats_of
from .ollama import human_count, parameter_count


def event(item) -> str:
    return sse(dump(item), event=item.type)


def error_event(e: ApiError | EngineBusy) -> str:
    status, message = (503, str(e)) if isinstance(e, EngineBusy) else (e.status, e.message)
    kind = {404: "model_not_found"}.get(status, "invalid_request" if status < 500 else "unknown")
    return event(V1ErrorEvent(error=V1ErrorDetail(type=kind, message=message)))


class ChatBuilder:
    """`start`, `step` per step output, then `finish`: the events to stream when `streaming`,
    and the result (`response`). `load_seconds`: the load this request waited for, if any."""

    def __init__(self, *, instance_id: str, load_seconds: float | None, streaming: bool):
        self.instance_id, self.load_seconds, self.streaming = instance_id, load_seconds, streaming
        # ("reasoning" | "message", text parts) or ("tool_call", [its V1ToolCallOutput])
        self.items: list[tuple[str, list]] = []
        self.prompt_done = False
        self.response: V1ChatResponse | None = None

    def _lines(self, events: list) -> list[str]:
        return [event(e) for e in events] if self.streaming else []

    def start(self) -> list[str]:
        events: list = [V1ChatStart(model_instance_id=self.instance_id)]
        if self.load_seconds is not None:
            events += [
                V1ModelLoadStart(model_instance_id=self.instance_id),
                V1ModelLoadEnd(
                    model_instance_id=self.instance_id,
                    load_time_seconds=round(self.load_seconds, 3),
                ),
            ]
        events.append(V1Marker(type="prompt_processing.start"))
        return self._lines(events)

    def _prompt_done(self) -> list:
        if self.prompt_done:
            return []
        self.prompt_done = True
        return [V1Marker(type="prompt_processing.end")]

    def _add(self, kind: str, text: str) -> list:
        events = []
        if not self.items or self.items[-1][0] != kind:
            if self.items and self.items[-1][0] != "tool_call":  # its events closed it
                events.append(V1Marker(type=f"{self.items[-1][0]}.end"))
            events.append(V1Marker(type=f"{kind}.start"))
            self.items.append((kind, []))
        self.items[-1][1].append(text)
        events.append(V1Delta(type=f"{kind}.delta", content=text))
        return events

    def step(self, step) -> list[str]:
        events = self._prompt_done()
        if step.reasoning:
            events += self._add("reasoning", step.reasoning)
        if step.content:
            events += self._add("message", step.content)
        return self._lines(events)

    def tool_call(self, call: McpCall, arguments: dict) -> list[str]:
        """A call the server ran (after the turn that made it): its item and events."""
        events = self._prompt_done()
        if self.items and self.items[-1][0] != "tool_call":
            events.append(V1Marker(type=f"{self.items[-1][0]}.end"))
        info = V1ProviderInfo(plugin_id=f"mcp/{call.server}")
        item = V1ToolCallOutput(
            tool=call.name, arguments=arguments, output=call.content, provider_info=info
        )
        self.items.append(("tool_call", [item]))
        events += [
            V1ToolCallStart(tool=call.name, provider_info=info),
            V1ToolCallArguments(tool=call.name, arguments=arguments, provider_info=info),
        ]
        if call.is_error:
            metadata = {"tool_name": call.name, "arguments": arguments, "plugin_id": info.plugin_id}
            events.append(V1ToolCallFailure(reason=call.content, metadata=metadata))
        else:
            events.append(
                V1ToolCallSuccess(
                    tool=call.name, arguments=arguments, output=call.content, provider_info=info
                )
            )
        return self._lines(events)

    def finish(self, finished: Finished) -> list[str]:
        events = self._prompt_done()
        if self.items and self.items[-1][0] != "tool_call":
            events.append(V1Marker(type=f"{self.items[-1][0]}.end"))
        tools = [i for i, (kind, _) in enumerate(self.items) if kind == "tool_call"]
        if not any(kind == "message" for kind, _ in self.items[tools[-1] + 1 if tools else 0 :]):
            self.items.append(("message", []))  # a reply always has its message, maybe empty
        stats = stats_of([finished])
        output = [
            parts[0]
            if kind == "tool_call"
            else (V1ReasoningOutput if kind == "reasoning" else V1MessageOutput)(
                content="".join(parts)
            )
            for kind, parts in self.items
        ]
        self.response = V1ChatResponse(
            model_instance_id=self.instance_id,
            output=output,
            stats=V1Stats(
                input_tokens=finished.prompt_tokens,
                total_output_tokens=finished.completion_tokens,
                reasoning_output_tokens=finished.reasoning_tokens,
                tokens_per_second=stats.tokens_per_second,
                time_to_first_token_seconds=stats.time_to_first_token,
                model_load_time_seconds=(
                    None if self.load_seconds is None else round(self.load_seconds, 3)
                ),
            ),
        )
        events.append(V1ChatEnd(result=self.response))
        return self._lines(events)


def v1_model(entry: CatalogEntry | None, loaded: LoadedModel | None, parallel: int) -> V1Model:
    """A model as `GET /api/v1/models` lists it (`entry`: as found on disk; `loaded`: if it is)."""
    source = loaded if loaded is not None else entry
    llm = source.kind == "llm"
    instances = []
    if loaded is not None:
        config = V1InstanceConfig(
            context_length=loaded.context_length, parallel=parallel if llm else None
        )
        instances.append(V1LoadedInstance(id=loaded.id, config=config))
    if entry is not None:
        size, count = entry.size_bytes, entry.parameter_count
        bits, native = entry.bits_per_weight, entry.native_context_length
    else:
        size, count, bits, native = loaded.weights_bytes, parameter_count(loaded), None, 0
    reasoning = V1ReasoningOptions(allowed_options=REASONING_OPTIONS, default="on")
    return V1Model(
        type="llm" if llm else "embedding",
        publisher=source.publisher,
        key=source.id,
        display_name=source.id.rsplit("/", 1)[-1],
        architecture=source.arch if llm else None,
        quantization=V1Quantization(name=source.quantization, bits_per_weight=bits),
        size_bytes=size,
        params_string=human_count(count) if count else None,
        loaded_instances=instances,
        max_context_length=max(native, loaded.context_length if loaded is not None else 0),
        capabilities=V1Capabilities(reasoning=reasoning) if llm else None,
    )

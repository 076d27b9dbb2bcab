"""The tool loop the server runs for a request that opts in (`mcp` on /v1/chat/completions,
`integrations` on LM Studio's /api/v1/chat): generate, run the model's calls of MCP tools
(mcp_tools.py), hand the results back as `tool` messages, generate again, until the model
answers without a call.

Each turn is the chat route's own path: the request (with the tools and the messages so far) →
`prepare_chat` → the engine's rows (`Api.start`) → step outputs; nothing here generates. The
turns come out as one stream of events (`Turn`, `Step`, `Ran`, `Done`) that the chat reply
(`chat_reply`) and LM Studio's (routes_lmstudio) each write in their API's shape.

Limits: tools only from the servers started with --mcp-config, narrowed by the request's
allow-list; each call bounded by --mcp-timeout; at most --mcp-max-calls calls per request
(then the model answers without tools). A call of a tool the client offered itself ends the
loop: that call is the client's to run, as without `mcp`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from .engine import EngineBusy
from .jobs import Finished, Output
from .loader import ttl_of
from .mcp_tools import McpHub, McpTool, ToolResult
from .models import LoadedModel
from .output.chat import ChatCollector, ChatStreamer
from .output.common import Thinking, chunk_sse, reasoning_format
from .prepare import ApiError, Prepared, prepare_chat
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    ChunkChoice,
    new_id,
    now,
)
from .protocol.mcp import McpCall, McpSelection, ToolResultDelta
from .rows import SSE_HEADERS, Rows, openai_error_event

log = logging.getLogger("qwen3_mlx.server.mcp")

# -- which tools a request gets -------------------------------------------------------------------


def offered_tools(
    hub: McpHub | None, allowed: dict[str, list[str] | None] | None, param: str
) -> dict[str, McpTool]:
    """Tool name → tool, for `allowed` (server name → its allowed tool names, None: all of
    them; `allowed` None: every server's every tool)."""
    if hub is None:
        raise ApiError(
            400,
            f"{param}: this server runs no MCP servers (start it with --mcp-config FILE)",
            param=param,
        )
    if allowed is None:
        allowed = {name: None for name in hub.servers}
    offered: dict[str, McpTool] = {}
    for server, names in allowed.items():
        if server not in hub.servers:
            raise ApiError(
                400,
                f"{param}: no MCP server '{server}' (--mcp-config has: "
                f"{', '.join(hub.servers) or 'none'})",
                param=param,
            )
        tools = {t.name: t for t in hub.servers[server].tools}
        for name in names if names is not None else list(tools):
            if name not in tools:
                raise ApiError(
                    400,
                    f"{param}: MCP server '{server}' has no tool '{name}' (it has: "
                    f"{', '.join(tools) or 'none'})",
                    param=param,
                )
            if name in offered and offered[name].server != server:
                raise ApiError(
                    400,
                    f"{param}: MCP servers '{offered[name].server}' and '{server}' both have a "
                    f"tool '{name}': allow one of them",
                    param=param,
                )
            offered[name] = tools[name]
    return offered


def chat_selection(selection: bool | McpSelection) -> dict[str, list[str] | None] | None:
    """The `mcp` field of a chat request as `offered_tools` takes it."""
    if selection is True or (selection.servers is None and selection.tools is None):
        return None
    return (
        {"*": selection.tools}
        if selection.servers is None
        else {s: selection.tools for s in selection.servers}
    )


def resolve_selection(hub: McpHub | None, allowed, param: str) -> dict[str, McpTool]:
    """`offered_tools`, with a tool allow-list that names no server ("*") applying across all
    servers: a name must be some server's tool."""
    if hub is not None and allowed is not None and "*" in allowed:
        names = allowed["*"] or []
        every = offered_tools(hub, None, param) if hub.servers else {}
        missing = [n for n in names if n not in every]
        if missing:
            raise ApiError(
                400, f"{param}.tools: no MCP server has a tool '{missing[0]}'", param=param
            )
        return {n: every[n] for n in names}
    return offered_tools(hub, allowed, param)


def with_tools(body: ChatCompletionRequest, offered: dict[str, McpTool]) -> list:
    """The request's own tools plus the MCP tools, as chat's `tools` (the template writes them
    into the prompt)."""
    own = [t.model_dump(exclude_none=True) for t in body.tools or []]
    clash = sorted({t["function"]["name"] for t in own} & set(offered))
    if clash:
        raise ApiError(
            400, f"tools: '{clash[0]}' is also an MCP tool of this request", param="tools"
        )
    return own + [t.openai() for t in offered.values()]


# -- the loop's events -----------------------------------------------------------------------------


@dataclass
class Turn:
    prepared: Prepared  # a turn began: its prompt (the reply's Thinking starts afresh)


@dataclass
class Step:
    step: object  # a SequenceOutput, tool call indices counted over the whole reply


@dataclass
class Ran:
    call: McpCall  # a call the server ran, and its result


@dataclass
class Done:
    finished: Finished  # the last turn's, with every turn's tokens counted


def merged(turns: list[Finished]) -> Finished:
    """The last turn's ending, counting every turn's tokens and time (the reply's usage)."""
    last = turns[-1]
    return replace(
        last,
        prompt_tokens=sum(f.prompt_tokens for f in turns),
        completion_tokens=sum(f.completion_tokens for f in turns),
        reasoning_tokens=sum(f.reasoning_tokens for f in turns),
        cached_tokens=sum(f.cached_tokens for f in turns),
        time_to_first_token=turns[0].time_to_first_token,
        generation_time=sum(f.generation_time for f in turns),
    )


class ToolLoop:
    """One request's turns. `events` runs them; `cancel` stops the running turn (the client
    left)."""

    def __init__(
        self,
        api,
        http: Request,
        model: LoadedModel,
        body: ChatCompletionRequest,
        offered: dict[str, McpTool],
        hub: McpHub,
    ):
        self.api, self.http, self.model, self.hub = api, http, model, hub
        self.body, self.offered = body, offered
        self.tools = [ChatTool.model_validate(t) for t in with_tools(body, offered)]
        self.running: Rows | None = None
        self.calls: list[McpCall] = []

    def cancel(self) -> None:
        if self.running is not None:
            self.running.cancel()

    async def events(self) -> AsyncIterator[Turn | Step | Ran | Done]:
        messages = list(self.body.messages)
        tool_choice, turns, index_base = self.body.tool_choice, [], 0
        while True:
            turn = self.body.model_copy(
                update={"messages": messages, "tools": self.tools, "tool_choice": tool_choice}
            )
            prepared = await run_in_threadpool(prepare_chat, turn, self.model, self.api.limits)
            yield Turn(prepared)
            self.running = self.api.start(self.model, [[prepared.sequence]])
            reasoning, content, calls, finished = [], [], {}, None
            async for _, event in self.running.events(self.http):
                if not isinstance(event, Output):
                    finished = event
                    continue
                step = event.step
                reasoning.append(step.reasoning)
                content.append(step.content)
                for d in step.tool_calls:
                    call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
                    call["arguments"] += d.arguments_delta
                if step.tool_calls and index_base:
                    shifted = [replace(d, index=d.index + index_base) for d in step.tool_calls]
                    step = replace(step, tool_calls=shifted)
                yield Step(step)
            if finished is None or finished.finish_reason == "abort":
                raise ApiError(499, "client disconnected")
            turns.append(finished)
            ours = [c for c in calls.values() if c["name"] in self.offered]
            if finished.finish_reason != "tool_calls" or not ours or len(ours) < len(calls):
                yield Done(merged(turns))
                return
            index_base += len(calls)
            messages = messages + [self._assistant(reasoning, content, ours)]
            for call in ours:
                result = await self._run(call)
                messages.append(
                    ChatMessage.model_validate(
                        {"role": "tool", "tool_call_id": call["id"], "content": result.content}
                    )
                )
                ran = McpCall(
                    id=call["id"],
                    server=self.offered[call["name"]].server,
                    name=call["name"],
                    arguments=call["arguments"] or "{}",
                    content=result.content,
                    is_error=result.is_error,
                )
                self.calls.append(ran)
                yield Ran(ran)
            if len(self.calls) >= self.hub.max_calls:
                tool_choice = "none"  # the cap is reached: the next turn answers

    async def _run(self, call: dict) -> ToolResult:
        if len(self.calls) >= self.hub.max_calls:
            return ToolResult(
                f"error: not run: this request made its {self.hub.max_calls} tool calls "
                "(--mcp-max-calls)",
                True,
            )
        return await self.hub.call(self.offered[call["name"]], call["arguments"])

    @staticmethod
    def _assistant(reasoning: list[str], content: list[str], calls: list[dict]) -> ChatMessage:
        """The turn as the next prompt shows it: its reasoning kept (Qwen3's template keeps
        the thinking of the turns after the last user message), its calls."""
        message = {
            "role": "assistant",
            "content": "".join(content),
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"] or "{}"},
                }
                for c in calls
            ],
        }
        if "".join(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        return ChatMessage.model_validate(message)


# -- /v1/chat/completions with `mcp` -------------------------------------------------------------


async def chat_with_tools(api, http: Request, body: ChatCompletionRequest, lmstudio: bool):
    """The chat route's reply, with the MCP tools run by the server (see the module doc)."""
    hub = api.settings.mcp
    offered = resolve_selection(hub, chat_selection(body.mcp), "mcp")
    if body.n != 1:
        raise ApiError(400, "n: the MCP tool loop runs one choice (n 1)", param="n")
    model = await api.load(body.model, ttl=ttl_of(body))
    loop = ToolLoop(api, http, model, body, offered, hub)
    fmt = reasoning_format(body.reasoning_format, api.settings.reasoning_format)
    id, created = new_id("chatcmpl"), now()
    if body.stream:
        streamer = ChatStreamer(
            id=id,
            created=created,
            model=model,
            thinking=[Thinking(fmt, "open")],
            lmstudio=lmstudio,
            want_logprobs=body.logprobs,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        return StreamingResponse(
            _stream(loop, streamer, fmt),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(loop.cancel),
        )
    collector = ChatCollector(model, [Thinking(fmt, "open")], body.logprobs)
    finished = None
    try:
        async for event in loop.events():
            if isinstance(event, Turn):
                choice = collector.choices[0]
                choice.thinking = Thinking(fmt, event.prepared.prompt_state)
                choice.calls = {}  # the calls the server ran are in mcp_calls
            elif isinstance(event, Step):
                collector.add(0, event.step)
            elif isinstance(event, Done):
                finished = event.finished
    finally:
        loop.cancel()
    reply = collector.response(
        id=id, created=created, model=model, finished=[finished], lmstudio=lmstudio
    )
    reply["choices"][0]["message"]["mcp_calls"] = [c.model_dump() for c in loop.calls]
    return JSONResponse(reply)


async def _stream(loop: ToolLoop, streamer: ChatStreamer, fmt) -> AsyncIterator[str]:
    for line in streamer.start():
        yield line
    try:
        async for event in loop.events():
            if isinstance(event, Turn):
                streamer.thinking[0] = Thinking(fmt, event.prepared.prompt_state)
            elif isinstance(event, Step):
                for line in streamer.step(0, event.step):
                    yield line
            elif isinstance(event, Ran):
                yield tool_result_chunk(streamer, event.call)
            else:
                for line in streamer.finish(0, event.finished) + streamer.end([event.finished]):
                    yield line
    except (ApiError, EngineBusy) as e:
        yield openai_error_event(e)
    except Exception as e:  # noqa: BLE001 - the status is sent: the stream says what broke
        log.exception("MCP tool loop failed")
        yield openai_error_event(ApiError(500, f"internal server error: {type(e).__name__}: {e}"))


def tool_result_chunk(streamer: ChatStreamer, call: McpCall) -> str:
    """The chunk that carries a call's result: its delta has role "tool" (protocol.mcp)."""
    delta = ToolResultDelta(
        tool_call_id=call.id, name=call.name, content=call.content, is_error=call.is_error
    )
    chunk = ChatCompletionChunk(
        id=streamer.id,
        created=streamer.created,
        model=streamer.model.id,
        choices=[ChunkChoice(index=0, delta=delta)],
    )
    return chunk_sse(chunk)


def arguments_object(arguments: str) -> dict:
    """A call's arguments as an object (LM Studio's items carry them parsed)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

"""LM Studio 0.4's native REST API: `GET /api/v1/models`, `POST /api/v1/models/load`,
`POST /api/v1/models/unload` and `POST /api/v1/chat`.

A chat request is translated into the chat completion request it amounts to (lmstudio_input),
then runs the chat route's path: `prepare_chat` (template, tokens, limits, sampling, thinking
budget), the engine, and output.lmstudio_v1 for the result or its events. The model a request
names is loaded if it is not (loader.py), as LM Studio's JIT loading does, and the reply's
`stats.model_load_time_seconds` says how long that took.

With `integrations` (MCP servers of --mcp-config) the server runs the model's tool calls
(mcp_loop.ToolLoop: the same turns, each through `prepare_chat`); `GET /api/v1/mcp` lists those
servers, their state and their tools.

Models are the server's catalog (catalog.py): the list shows each with its loaded instance (one
per model here; its id is the model's key), and load / unload act on them by that name. Errors
are `{"error": {"message", "type", "code", "param"}}`, the envelope LM Studio's API shares with
OpenAI's.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .catalog import CatalogEntry
from .engine import EngineBusy
from .lmstudio_input import chat_of
from .loader import UNSET
from .mcp_loop import Done, Ran, Step, ToolLoop, arguments_object, resolve_selection
from .models import LoadedModel, ModelNotFound
from .openapi import operation_responses
from .output.common import dump
from .output.lmstudio_v1 import ChatBuilder, error_event, v1_model
from .prepare import ApiError, check_generates, prepare_chat
from .protocol.lmstudio_v1 import (
    V1ChatRequest,
    V1ChatResponse,
    V1LoadConfig,
    V1LoadRequest,
    V1LoadResponse,
    V1ModelList,
    V1UnloadRequest,
    V1UnloadResponse,
)
from .protocol.mcp import McpServerList
from .routes import Api
from .rows import SSE_HEADERS

PREFIX = "/api/v1"

STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events `event: <type>` / `data: <event>`: chat.start, "
    "model_load.start and model_load.end (when the request loaded the model), "
    "prompt_processing.start and .end, reasoning.start / .delta / .end, message.start / .delta "
    "/ .end, then chat.end holding the result. An error after the stream began is an `error` "
    "event."
)
DESCRIBED = {
    404: "No model of this name in the server's catalog (or, to unload, none loaded).",
    503: "The queue is full, or the model can't be loaded now (--max-loaded-models reached "
    "with every model serving requests, or not enough memory), or unloaded (it is serving "
    "requests).",
}


def responses_of(errors: tuple[int, ...], stream: bool = False) -> dict:
    return operation_responses(
        errors, STREAM_DESCRIPTION if stream else None, reply="The result", described=DESCRIBED
    )


class LMStudioV1Api:
    def __init__(self, api: Api):
        self.api = api

    # Reads files (sizes, headers): a plain function, run in FastAPI's thread pool.
    def models(self) -> V1ModelList:
        parallel = getattr(self.api.engine, "max_concurrency", 1)
        return V1ModelList(
            models=[
                v1_model(entry, loaded, parallel) for entry, loaded in self.api.loader.listing()
            ]
        )

    async def load(self, body: V1LoadRequest) -> V1LoadResponse:
        loader = self.api.loader
        found = loader.lookup(body.model, any_name=False)
        if isinstance(found, CatalogEntry):
            model, seconds = await loader.load(
                found, context_length=body.context_length, ttl=body.ttl
            )
        else:
            model, seconds = found, 0.0
            if body.context_length is not None and body.context_length != model.context_length:
                raise ApiError(
                    400,
                    f"model '{model.id}' is loaded with a context of {model.context_length} "
                    f"tokens: unload it first to load it with {body.context_length}",
                    param="context_length",
                )
            if body.ttl is not None:
                loader.set_ttl(model.id, body.ttl)
        config = V1LoadConfig(context_length=model.context_length)
        return V1LoadResponse(
            type="llm" if model.kind == "llm" else "embedding",
            instance_id=model.id,
            load_time_seconds=round(seconds, 3),
            load_config=config if body.echo_load_config else None,
        )

    async def unload(self, body: V1UnloadRequest) -> V1UnloadResponse:
        loader = self.api.loader
        try:
            found = loader.lookup(body.instance_id, any_name=False)
        except ModelNotFound as e:
            found = e
        if not isinstance(found, LoadedModel):
            raise ApiError(
                404,
                f"no loaded model instance {body.instance_id!r}",
                param="instance_id",
                code="model_not_found",
            )
        await loader.unload(found.id)
        return V1UnloadResponse(instance_id=found.id)

    def mcp_servers(self) -> McpServerList:
        hub = self.api.settings.mcp
        return hub.listing() if hub is not None else McpServerList(servers=[])

    async def chat(self, http: Request, body: V1ChatRequest):
        offered = None
        if body.integrations:
            offered = resolve_selection(
                self.api.settings.mcp, integration_selection(body.integrations), "integrations"
            )
        hold = await self.api.loader.acquire(
            body.model,
            kind="llm",
            ttl=UNSET if body.ttl is None else body.ttl,
            context_length=body.context_length,
        )
        model = hold.model
        check_generates(model)
        chat = chat_of(body)
        if offered is not None:
            return await self.chat_with_tools(http, body, chat, model, hold, offered)
        prepared = await run_in_threadpool(prepare_chat, chat, model, self.api.limits)
        running = self.api.start(model, [[prepared.sequence]])
        builder = ChatBuilder(
            instance_id=model.id, load_seconds=hold.load_seconds, streaming=body.stream
        )
        return await running.reply(
            http, builder, body.stream, lambda: dump(builder.response), error_event
        )

    async def chat_with_tools(self, http, body, chat, model, hold, offered):
        """`integrations`: the turns of mcp_loop.ToolLoop written as LM Studio's result."""
        loop = ToolLoop(self.api, http, model, chat, offered, self.api.settings.mcp)
        builder = ChatBuilder(
            instance_id=model.id, load_seconds=hold.load_seconds, streaming=body.stream
        )

        async def lines():
            for line in builder.start():
                yield line
            try:
                async for event in loop.events():
                    if isinstance(event, Step):
                        out = builder.step(event.step)
                    elif isinstance(event, Ran):
                        out = builder.tool_call(event.call, arguments_object(event.call.arguments))
                    elif isinstance(event, Done):
                        out = builder.finish(event.finished)
                    else:
                        out = []
                    for line in out:
                        yield line
            finally:
                loop.cancel()

        if body.stream:

            async def stream():
                try:
                    async for line in lines():
                        yield line
                except (ApiError, EngineBusy) as e:
                    yield error_event(e)

            return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        async for _ in lines():
            pass
        return JSONResponse(dump(builder.response))


def integration_selection(integrations: list) -> dict[str, list[str] | None]:
    """LM Studio's `integrations` as mcp_loop takes them: server name → allowed tools."""
    allowed: dict[str, list[str] | None] = {}
    for item in integrations:
        plugin = item if isinstance(item, str) else item.id
        name = plugin.removeprefix("mcp/")
        tools = None if isinstance(item, str) else item.allowed_tools
        if name in allowed and allowed[name] is not None and tools is not None:
            tools = [*allowed[name], *tools]
        elif name in allowed:
            tools = None
        allowed[name] = tools
    return allowed


def register_lmstudio_v1(app: FastAPI, api: Api) -> None:
    handlers = LMStudioV1Api(api)
    router = APIRouter(prefix=PREFIX)
    for method, path, handler, model, responses, name in (
        ("GET", "/models", handlers.models, V1ModelList, responses_of(()), "models"),
        ("GET", "/mcp", handlers.mcp_servers, McpServerList, responses_of(()), "mcp"),
        ("POST", "/models/load", handlers.load, V1LoadResponse, responses_of((400, 404, 503)), "load"),
        ("POST", "/models/unload", handlers.unload, V1UnloadResponse, responses_of((400, 404, 503)), "unload"),
        ("POST", "/chat", handlers.chat, V1ChatResponse, responses_of((400, 404, 503), stream=True), "chat"),
    ):  # fmt: skip
        router.add_api_route(
            path,
            handler,
            methods=[method],
            response_model=model,
            response_model_exclude_none=True,  # LM Studio leaves out what doesn't apply
            responses=responses,
            name=f"lmstudio_v1_{name}",
        )
    app.include_router(router)

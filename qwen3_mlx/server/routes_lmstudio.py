"""LM Studio 0.4's native REST API: `GET /api/v1/models`, `POST /api/v1/models/load`,
`POST /api/v1/models/unload` and `POST /api/v1/chat`.

A chat request is translated into the chat completion request it amounts to (lmstudio_input),
then runs the chat route's path: `prepare_chat` (template, tokens, limits, sampling, thinking
budget), the engine, and output.lmstudio_v1 for the result or its events. The model a request
names is loaded if it is not (loader.py), as LM Studio's JIT loading does, and the reply's
`stats.model_load_time_seconds` says how long that took.

Models are the server's catalog (catalog.py): the list shows each with its loaded instance (one
per model here; its id is the model's key), and load / unload act on them by that name. Errors
are `{"error": {"message", "type", "code", "param"}}`, the envelope LM Studio's API shares with
OpenAI's.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .catalog import CatalogEntry
from .lmstudio_input import chat_of
from .loader import UNSET
from .models import LoadedModel, ModelNotFound
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
from .routes import Api, operation_responses

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

    async def chat(self, http: Request, body: V1ChatRequest):
        lease = await self.api.loader.acquire(
            body.model,
            kind="llm",
            ttl=UNSET if body.ttl is None else body.ttl,
            context_length=body.context_length,
        )
        model = lease.model
        check_generates(model)
        chat = chat_of(body)
        prepared = await run_in_threadpool(prepare_chat, chat, model, self.api.limits)
        running = self.api.start(model, [[prepared.sequence]])
        builder = ChatBuilder(
            instance_id=model.id, load_seconds=lease.load_seconds, streaming=body.stream
        )
        if body.stream:
            return running.stream(
                http,
                builder.start(),
                lambda _, step: builder.step(step),
                lambda _, finished: builder.finish(finished),
                lambda _: [],
                error_event=error_event,
            )
        builder.start()
        finished = await running.collect(http, lambda _, step: builder.step(step))
        builder.finish(finished[0])
        return JSONResponse(dump(builder.response))


def register_lmstudio_v1(app: FastAPI, api: Api) -> None:
    handlers = LMStudioV1Api(api)
    router = APIRouter(prefix=PREFIX)
    for method, path, handler, model, responses, name in (
        ("GET", "/models", handlers.models, V1ModelList, responses_of(()), "models"),
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

"""Ollama's native API: `POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `POST /api/show`,
`GET /api/ps` and `GET /api/version`.

A chat or generate request is translated into the chat (or text completion) request it amounts
to (ollama_input), then runs that route's path: `prepare_chat` / `prepare_completion` (template,
tokens, limits, sampling, grammar, thinking budget), the engine, and output.ollama for the
records. Ollama streams unless a request says `"stream": false`: JSON lines
(`application/x-ndjson`), the last with `done: true`.

Model names are Ollama's: a request must name a model the server has (as `/api/tags` lists it,
`:latest` or not, in any case), else a 404 `model 'x' not found`, as Ollama answers; the OpenAI
routes' "one model serves every name" doesn't hold here. A model not loaded is loaded
(loader.py; the reply's `load_duration` says how long it took), and `keep_alive` becomes its idle
TTL (0: unloaded when the request ends; negative: stays loaded); a request with nothing to
generate and `keep_alive: 0` unloads it, as Ollama's does. Errors on `/api/*` (all but LM
Studio's `/api/v0` and `/api/v1`), the guards' included, leave in Ollama's shape
`{"error": "message"}` (`OllamaErrors`).
"""

from __future__ import annotations

import time

import mlx.core as mx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .catalog import CatalogEntry
from .guard import ErrorReshaper
from .loader import Hold
from .models import LoadedModel, ModelNotFound
from .ollama_input import chat_of, generate_of, keep_alive_seconds, ollama_error
from .openapi import ERROR_HEADERS, ERRORS, GUARDED
from .output.ollama import NDJSON, Records, entry, error_line, loaded, running, show
from .prepare import ApiError, check_generates, prepare_chat, prepare_completion
from .protocol import ChatCompletionRequest
from .protocol.ollama import (
    OllamaChatRecord,
    OllamaChatRequest,
    OllamaErrorResponse,
    OllamaGenerateRecord,
    OllamaGenerateRequest,
    OllamaModelList,
    OllamaRunningList,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaVersion,
)
from .routes import Api

# The Ollama release whose API these routes follow (records, tool call ids and indexes, `think`
# levels): clients read /api/version to know what a server understands.
OLLAMA_API_VERSION = "0.13.5"

INVALID = (
    "Invalid request: a field fails validation, or the request can't be served as asked (a "
    "prompt longer than the model's context, `num_predict` over --max-tokens-limit, images, "
    "a `suffix`…)."
)
NOT_FOUND = "No model of the server has this name (`model 'x' not found`)."


def is_ollama(path: str) -> bool:
    """Ollama's paths: `/api/*` but LM Studio's `/api/v0` and `/api/v1`."""
    path = path.rstrip("/")
    lmstudio = any(path == p or path.startswith(p + "/") for p in ("/api/v0", "/api/v1"))
    return path.startswith("/api/") and not lmstudio


def responses_of(errors: tuple[int, ...], record: type | None = None) -> dict:
    """The `responses=` of an operation: with `record`, a stream of such records; the errors."""
    out: dict = {}
    if record is not None:
        out[200] = {
            "description": 'The reply (JSON) with `"stream": false`; else a stream of records, '
            "one JSON object per line, the last with `done: true` (an error after the stream "
            'began is a line `{"error": "..."}`).',
            "content": {
                NDJSON: {
                    "schema": {
                        "anyOf": [
                            {"$ref": f"#/components/schemas/{record.__name__}"},
                            {"$ref": "#/components/schemas/OllamaErrorResponse"},
                        ]
                    }
                }
            },
        }
    for code in sorted({*GUARDED, *errors}):
        described = {400: INVALID, 404: NOT_FOUND}.get(code, ERRORS[code])
        out[code] = {"model": OllamaErrorResponse, "description": described}
        if code in ERROR_HEADERS:
            out[code]["headers"] = ERROR_HEADERS[code]
    return out


class OllamaApi:
    def __init__(self, api: Api):
        self.api = api

    def lookup(self, name: str) -> LoadedModel | CatalogEntry:
        """The model `name` names (Ollama's `:latest` tag optional), loaded or not, else a 404."""
        for candidate in (name, name.removesuffix(":latest")):
            try:
                return self.api.loader.lookup(candidate, any_name=False)
            except ModelNotFound:
                pass
        raise ApiError(404, f"model '{name}' not found", param="model")

    async def acquire(self, name: str, keep_alive=None) -> Hold:
        """The model `name` names, loaded if it is not; `keep_alive` becomes its TTL."""
        found = self.lookup(name)
        return await self.api.loader.acquire(
            found.id, keep_alive=keep_alive_seconds(keep_alive), any_name=False
        )

    async def _load_request(self, body, chat: bool) -> JSONResponse:
        """Nothing to generate: Ollama's way to load a model, or with `keep_alive: 0` to unload
        it (when the requests it serves have ended)."""
        ttl = keep_alive_seconds(body.keep_alive)
        found = self.lookup(body.model)
        if found.kind != "llm":
            check_generates(found)  # a 400: an embedding model (nothing is loaded for it)
        if ttl == 0:
            if isinstance(found, LoadedModel):
                self.api.loader.set_ttl(found.id, 0.0)
            return JSONResponse(loaded(body.model, chat=chat, reason="unload"))
        await self.api.loader.acquire(found.id, keep_alive=ttl, any_name=False)
        return JSONResponse(loaded(body.model, chat=chat))

    async def chat(self, http: Request, body: OllamaChatRequest):
        started = time.perf_counter()
        if not body.messages:
            return await self._load_request(body, chat=True)
        hold = await self.acquire(body.model, body.keep_alive)
        check_generates(hold.model)
        return await self._run(http, hold, chat_of(body), body, started, chat=True)

    async def generate(self, http: Request, body: OllamaGenerateRequest):
        started = time.perf_counter()
        if not body.prompt:
            return await self._load_request(body, chat=False)
        hold = await self.acquire(body.model, body.keep_alive)
        check_generates(hold.model)
        return await self._run(http, hold, generate_of(body), body, started, chat=False)

    async def _run(self, http: Request, hold: Hold, request, body, started, chat: bool):
        model = hold.model

        def prepare():
            if isinstance(request, ChatCompletionRequest):
                return prepare_chat(request, model, self.api.limits)
            return prepare_completion(request, model, self.api.limits)[0]

        try:
            prepared = await run_in_threadpool(prepare)
        except ApiError as e:
            raise ollama_error(e) from None
        running_rows = self.api.start(model, [[prepared.sequence]])
        records = Records(
            name=body.model,
            chat=chat,
            streaming=body.stream,
            started=started,
            raw=not isinstance(request, ChatCompletionRequest),
            load=hold.load_seconds or 0.0,
        )
        if body.stream:
            return running_rows.stream(
                http,
                [],
                lambda _, step: records.step(step),
                lambda _, finished: records.finish(finished),
                lambda _: [],
                error_event=error_line,
                media_type=NDJSON,
            )
        finished = await running_rows.collect(http, lambda _, step: records.step(step))
        records.finish(finished[0])
        return JSONResponse(records.reply())

    # Listings read files and walk the model's modules: plain functions, so they run in
    # FastAPI's thread pool rather than on the event loop.

    def tags(self) -> OllamaModelList:
        """Every model the server can serve, loaded or not."""
        listing = self.api.loader.listing()
        return OllamaModelList(models=[entry(m or e) for e, m in listing])

    async def show(self, body: OllamaShowRequest) -> OllamaShowResponse:
        """A model's details, read from it loaded (a model not loaded is loaded first)."""
        model = (await self.acquire(body.model)).model
        return await run_in_threadpool(show, model)

    def ps(self) -> OllamaRunningList:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        loader = self.api.loader
        models = [running(m, on_gpu, loader.expires_at(m.id)) for m in self.api.registry]
        return OllamaRunningList(models=models)

    def version(self) -> OllamaVersion:
        return OllamaVersion(version=OLLAMA_API_VERSION)


def register_ollama(app: FastAPI, api: Api) -> None:
    handlers = OllamaApi(api)
    router = APIRouter(prefix="/api")
    for method, path, handler, model, responses in (
        ("POST", "/chat", handlers.chat, OllamaChatRecord, responses_of((400, 404, 503), OllamaChatRecord)),
        ("POST", "/generate", handlers.generate, OllamaGenerateRecord, responses_of((400, 404, 503), OllamaGenerateRecord)),
        ("GET", "/tags", handlers.tags, OllamaModelList, responses_of(())),
        ("POST", "/show", handlers.show, OllamaShowResponse, responses_of((400, 404))),
        ("GET", "/ps", handlers.ps, OllamaRunningList, responses_of(())),
        ("GET", "/version", handlers.version, OllamaVersion, responses_of(())),
    ):  # fmt: skip
        router.add_api_route(
            path,
            handler,
            methods=[method],
            response_model=model,
            responses=responses,
            name=f"ollama_{path[1:]}",
        )
    app.include_router(router)


class OllamaErrors(ErrorReshaper):
    """Errors on Ollama's paths in Ollama's shape, `{"error": "message"}`."""

    def matches(self, path: str) -> bool:
        return is_ollama(path)

    def reshape(self, status: int, message: str) -> dict:
        return {"error": message}

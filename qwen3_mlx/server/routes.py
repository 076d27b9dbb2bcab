"""The API's operations, and the one table that serves each under `/v1` and its `/api/v0` twin.

An operation validates (protocol), prepares (prepare: template, tokens, limits, grammar, one
`Sequence` per row — in a worker thread, so the event loop never blocks), runs its rows on the
engine (rows) and writes the reply for its API (output.*). `/api/v0` is the same operation with
`lmstudio=True`: the reply adds LM Studio's `stats`, `model_info` and `runtime`, and its model
routes answer with LM Studio's model cards.
"""

from __future__ import annotations

import base64
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine
from .loader import UNSET, ModelLoader
from .mcp_loop import chat_with_tools
from .models import LoadedModel, ModelRegistry
from .output.chat import ChatCollector, ChatStreamer
from .output.common import Thinking, reasoning_format
from .output.completions import CompletionReply, Echo, echo_of
from .output.lmstudio import model_card
from .output.scores import PromptScorer, can_score, embed_tokens
from .prepare import (
    ApiError,
    Limits,
    completion_prompts,
    prepare_chat,
    prepare_completion,
    rows,
)
from .protocol import (
    MAX_CHOICES,
    SEED_MAX,
    SEED_MIN,
    SERVER_LIMIT,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorResponse,
    LMStudioModel,
    LMStudioModelList,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    digits_up_to,
    new_id,
    now,
)
from .response_store import ResponseStore
from .routes_responses import create_response
from .rows import Rows

# -- what /openapi.json says each operation answers ----------------------------------------------

# Every error is OpenAI's error object (`ErrorResponse`), with one of these statuses. (Validation
# errors are 400, never FastAPI's 422.)
ERRORS = {
    400: "Invalid request: a field fails validation (`error.param` names it), or the request "
    "can't be served as asked (a prompt longer than the model's context, `max_tokens` over "
    "--max-tokens-limit, more choices than --max-queue, token ids outside the vocabulary, a "
    "chat model asked for embeddings…).",
    401: "Missing or wrong API key (only when the server runs with --api-key).",
    403: "The Host header names a host this server doesn't answer for (a guard against DNS "
    "rebinding; see --allowed-hosts).",
    404: "No such model (with several to serve, `model` must name one of them).",
    413: "The request body is over the server's limit (--max-body-mb).",
    503: "The queue is full (--max-queue), or the model can't be loaded now (--max-loaded-models "
    "reached with every model serving requests, or not enough memory): retry after the "
    "`Retry-After` header's seconds.",
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}},
}
# Any operation: the API key, the Host check and the body size are checked before it runs.
GUARDED = (401, 403, 413)

STREAM_DESCRIPTION = {
    "chat": "With `stream: true`: server-sent events, each `data: <chat.completion.chunk>` "
    "(a `ChatCompletionChunk`), then `data: [DONE]`. An error after the stream began is an "
    'event `data: {"error": {...}}`.',
    "completions": "With `stream: true`: server-sent events, each `data: <text_completion>` "
    "(a `Completion` holding the new text), then `data: [DONE]`. An error after the stream "
    'began is an event `data: {"error": {...}}`.',
    "responses": "With `stream: true`: server-sent events `event: <type>` / `data: <event>` "
    "(response.created, response.output_text.delta, …, response.completed), as OpenAI's "
    "Responses API streams them.",
}


def responses_of(route: Route) -> dict:
    """The `responses=` of a route's operation: 200's media types and each error status."""
    return operation_responses(route.errors, STREAM_DESCRIPTION.get(route.operation))


def operation_responses(
    errors: tuple[int, ...],
    stream: str | None = None,
    *,
    reply: str = "The reply",
    error_model: type = ErrorResponse,
    described: dict[int, str] | None = None,
) -> dict:
    """An operation's `responses=`: with `stream` (the events' description) 200 is JSON or
    server-sent events; each error status (GUARDED's too) with its model and description."""
    out: dict = {}
    if stream is not None:
        out[200] = {
            "description": f"{reply} (JSON), or with `stream: true` a stream of events.",
            "content": {
                # OpenAPI 3.1 has a stream's `schema` describe one event: its fields.
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": stream,
                        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                        "required": ["data"],
                    }
                }
            },
        }
    for code in sorted({*GUARDED, *errors}):
        out[code] = {"model": error_model, "description": (described or {}).get(code, ERRORS[code])}
        if code in ERROR_HEADERS:
            out[code]["headers"] = ERROR_HEADERS[code]
    return out


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under the prefix
    operation: str  # the `Api` method; its parameters (but `lmstudio`) are the endpoint's
    response: type  # the reply's schema on /v1
    lmstudio_response: type | None = None  # on /api/v0, when it differs
    lmstudio: bool = True  # also served under /api/v0
    errors: tuple[int, ...] = (400, 404, 503)  # statuses it answers besides GUARDED's


ROUTES = [
    Route("GET", "/models", "list_models", ModelList, LMStudioModelList, errors=()),
    Route("GET", "/models/{model_id:path}", "get_model", ModelCard, LMStudioModel, errors=(404,)),
    Route("POST", "/chat/completions", "chat", ChatCompletion),
    Route("POST", "/completions", "completions", Completion),
    Route("POST", "/embeddings", "embeddings", EmbeddingList, errors=(400, 404)),
    Route("POST", "/responses", "responses", ResponseObject, lmstudio=False),
]
PREFIXES = (("/v1", False), ("/api/v0", True))


def register(app: FastAPI, api: Api) -> None:
    """Serve every route of ROUTES under both prefixes (`/api/v0` calls it with lmstudio=True)."""
    for prefix, lmstudio in PREFIXES:
        router = APIRouter(prefix=prefix)
        for route in ROUTES:
            if lmstudio and not route.lmstudio:
                continue
            response = (lmstudio and route.lmstudio_response) or route.response
            router.add_api_route(
                route.path,
                _endpoint(getattr(api, route.operation), lmstudio),
                methods=[route.method],
                response_model=response,
                responses=responses_of(route),
                name=route.operation + ("_v0" if lmstudio else ""),
            )
        app.include_router(router)
    document_server(app, api)


def document_server(app: FastAPI, api: Api) -> None:
    """/openapi.json states this server's own bounds: each `x-server-limit` of the schemas
    (protocol.common) gets the value this server runs with, and FastAPI's 422, which this server
    never sends (validation errors are 400), goes."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _fill_limits(schema, server_limits(api))
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def server_limits(api: Api) -> dict[str, Callable[[dict], None]]:
    """`x-server-limit` kind → how a schema marked with it states this server's bound."""
    models = list(api.registry or ())  # none: an app documented without models (tests)
    # Valid for every model:
    last_id = min(m.model.args.vocab_size for m in models) - 1 if models else None
    max_queue = getattr(api.engine, "max_queue", None)

    def at_most(value: int | None):
        def fill(node: dict) -> None:
            if value is not None:
                key = "maxItems" if node.get("type") == "array" else "maximum"
                node[key] = min(node.get(key, value), value)

        return fill

    def not_named(kind: str, tags: tuple[str, ...] = ()):
        # With one model, every name is it; with several, another kind's model is a 400 (also
        # spelled with one of `tags`: Ollama's `name:latest`).
        others = sorted(m.id + tag for m in models if m.kind != kind for tag in ("", *tags))

        def fill(node: dict) -> None:
            if len(models) > 1 and others:
                node["not"] = {"enum": others}

        return fill

    return {
        "max-tokens": at_most(api.limits.max_tokens),
        "choices": at_most(MAX_CHOICES if max_queue is None else min(MAX_CHOICES, max_queue)),
        "token-id": at_most(last_id),
        "token-id-key": lambda node: (
            None if last_id is None else node.update(pattern=f"^0*{digits_up_to(last_id)}$")
        ),
        "seed": lambda node: node.update(minimum=SEED_MIN, maximum=SEED_MAX),
        "llm-model": not_named("llm"),
        # Only the draft the server was started with (none: only null).
        "draft-model": lambda node: node.update(
            enum=sorted({m.drafting.name for m in models if m.drafting is not None}) or [None]
        ),
        "embeddings-model": not_named("embeddings"),
        "ollama-llm-model": not_named("llm", (":latest",)),
    }


def _fill_limits(node, fill: dict[str, Callable[[dict], None]]) -> None:
    if isinstance(node, list):
        for item in node:
            _fill_limits(item, fill)
    elif isinstance(node, dict):
        if node.get(SERVER_LIMIT) in fill:
            fill[node[SERVER_LIMIT]](node)
        for child in node.values():
            _fill_limits(child, fill)


def _endpoint(operation, lmstudio: bool):
    """`operation` with `lmstudio` bound, and the signature FastAPI reads (resolved types)."""

    async def endpoint(**kwargs):
        return await operation(lmstudio=lmstudio, **kwargs)

    hints = typing.get_type_hints(operation)
    parameters = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(operation).parameters.values()
        if p.name != "lmstudio"
    ]
    endpoint.__signature__ = inspect.Signature(parameters)
    return endpoint


def ttl_of(body) -> float | None:
    """A request's `ttl` (LM Studio's), or UNSET when it gives none."""
    ttl = getattr(body, "ttl", None)
    return UNSET if ttl is None else ttl


class Api:
    def __init__(
        self, registry: ModelRegistry, engine: Engine, settings, loader: ModelLoader | None = None
    ):
        self.registry, self.engine, self.settings = registry, engine, settings
        if loader is None and registry is not None:
            loader = ModelLoader.serving(registry, engine)
        self.loader = loader
        self.limits = Limits(max_tokens=settings.max_tokens_limit)
        self.response_store = ResponseStore(
            settings.responses_store_size, settings.responses_max_age
        )

    def resolve(self, name: str | None) -> LoadedModel:
        """A loaded chat model, held until the response ends (not loaded: a 404; `load`
        loads it)."""
        return self.loader.acquire_loaded(name, kind="llm")

    async def load(self, name: str | None, kind: str = "llm", ttl=UNSET) -> LoadedModel:
        """The model `name` names, loaded if it is not (loader.py), held until the response
        ends; `ttl` (LM Studio's): its idle TTL if this request loads it."""
        return (await self.loader.acquire(name, kind=kind, ttl=ttl)).model

    def check_rows(self, count: int, param: str) -> None:
        """Refuse, before any work, a request for more rows than the engine's queue holds."""
        if count > self.engine.max_queue:
            raise ApiError(
                400,
                f"{param}: {count} choices in one request are more than this server queues "
                f"(--max-queue {self.engine.max_queue})",
                param=param,
            )

    def start(self, model: LoadedModel, groups) -> Rows:
        running = Rows(self.engine, model, groups)
        running.submit()
        return running

    # -- models -------------------------------------------------------------------------

    # Every model the server can serve, loaded or not (catalog.py); naming one loads nothing.
    async def list_models(self, lmstudio: bool):
        listing = await run_in_threadpool(self.loader.listing)
        if lmstudio:
            return LMStudioModelList(data=[model_card(m or e) for e, m in listing])
        return ModelList(data=[ModelCard(id=(m or e).id) for e, m in listing])

    async def get_model(self, model_id: str, lmstudio: bool):
        found = await run_in_threadpool(self.loader.lookup, model_id)
        return model_card(found) if lmstudio else ModelCard(id=found.id)

    # -- chat ---------------------------------------------------------------------------

    async def chat(self, http: Request, body: ChatCompletionRequest, lmstudio: bool):
        if body.mcp:
            return await chat_with_tools(self, http, body, lmstudio)
        model = await self.load(body.model, ttl=ttl_of(body))
        self.check_rows(body.n, "n")

        def prepare():
            prepared = prepare_chat(body, model, self.limits)
            return prepared, rows(prepared, body.n)

        prepared, sequences = await run_in_threadpool(prepare)
        fmt = reasoning_format(body.reasoning_format, self.settings.reasoning_format)
        thinking = [Thinking(fmt, prepared.prompt_state) for _ in sequences]
        running = self.start(model, [sequences])
        id, created = new_id("chatcmpl"), now()
        if body.stream:
            streamer = ChatStreamer(
                id=id,
                created=created,
                model=model,
                thinking=thinking,
                lmstudio=lmstudio,
                want_logprobs=body.logprobs,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return running.stream(
                http, streamer.start(), streamer.step, streamer.finish, streamer.end
            )
        collector = ChatCollector(model, thinking, body.logprobs)
        finished = await running.collect(http, collector.add)
        reply = collector.response(
            id=id, created=created, model=model, finished=finished, lmstudio=lmstudio
        )
        return JSONResponse(reply)

    # -- text completions ---------------------------------------------------------------

    async def completions(self, http: Request, body: CompletionRequest, lmstudio: bool):
        model = await self.load(body.model, ttl=ttl_of(body))
        n, prompts = body.n, len(completion_prompts(body))
        self.check_rows(n * prompts, "prompt" if prompts > 1 else "n")

        def prepare():
            prepared = prepare_completion(body, model, self.limits)
            return prepared, [rows(p, n, first=i * n) for i, p in enumerate(prepared)]

        prepared, groups = await run_in_threadpool(prepare)
        want_logprobs, top_n = body.logprobs is not None, body.logprobs or 0
        echoes: list[Echo | None] = [None] * len(prepared)
        if body.echo:
            echoes = [await self.echo(model, p.prompt, want_logprobs, top_n) for p in prepared]
        running = self.start(model, groups)
        reply = CompletionReply(
            id=new_id("cmpl"),
            created=now(),
            model=model,
            echoes=[e for e in echoes for _ in range(n)],
            want_logprobs=want_logprobs,
            top_n=top_n,
            leaders=running.leaders,
            lmstudio=lmstudio,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )
        if body.stream:
            return running.stream(http, reply.head(), reply.step, reply.finish, reply.end)
        finished = await running.collect(http, reply.add)
        return JSONResponse(reply.response(finished))

    async def echo(self, model: LoadedModel, prompt: list[int], logprobs: bool, top_n: int):
        """The prompt as `echo` returns it; its tokens' logprobs are computed on the engine
        thread, a chunk per call (null where the model can't run alone: under --parallel)."""
        scores = None
        if logprobs and can_score(model):
            scorer = PromptScorer(model, prompt, top_n)
            while not await self.engine.call(scorer.step):
                pass
            scores = scorer.scores()
        return await run_in_threadpool(
            lambda: echo_of(model, prompt, want_logprobs=logprobs, top_n=top_n, scores=scores)
        )

    # -- embeddings ---------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, lmstudio: bool):
        model = await self.load(body.model, kind="embeddings", ttl=ttl_of(body))
        if model.kind != "embeddings":
            raise ApiError(
                400,
                f"model '{model.id}' is not an embedding model (load a Qwen3-Embedding "
                "checkpoint, or pass --embedding for one without sentence-transformers files)",
                param="model",
                code="model_not_embedding",
            )
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        vocab = model.model.args.vocab_size
        end = model.tokenizer.token_to_id("<|endoftext|>")
        batches = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                tokens = model.tokenizer.encode(item)
            elif isinstance(item, list) and all(
                isinstance(t, int) and 0 <= t < vocab for t in item
            ):
                tokens = list(item)
            else:
                raise ApiError(
                    400, f"input[{i}]: expected text or token ids in 0..{vocab - 1}", param="input"
                )
            if end is not None and (not tokens or tokens[-1] != end):
                # Qwen3-Embedding pools the hidden state of a final <|endoftext|>.
                tokens.append(end)
            if len(tokens) > model.context_length:
                raise ApiError(
                    400,
                    f"input[{i}] is {len(tokens)} tokens but model '{model.id}' has a "
                    f"context of {model.context_length} tokens",
                    param="input",
                    code="context_length_exceeded",
                )
            batches.append(tokens)
        vectors = await self.engine.call(embed_tokens, model, batches, body.dimensions)
        data = []
        for i, v in enumerate(vectors):
            value = (
                base64.b64encode(v.astype(np.float32).tobytes()).decode()
                if body.encoding_format == "base64"
                else v.tolist()
            )
            data.append(Embedding(index=i, embedding=value))
        n = sum(len(t) for t in batches)
        return EmbeddingList(
            data=data, model=model.id, usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n)
        )

    # -- responses API ------------------------------------------------------------------

    async def responses(self, http: Request, body: ResponsesRequest, lmstudio: bool):
        return await create_response(self, http, body)

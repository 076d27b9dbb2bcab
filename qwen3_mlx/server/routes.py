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
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine
from .loader import UNSET, ModelLoader, ttl_of
from .mcp_loop import chat_with_tools
from .models import LoadedModel, ModelRegistry
from .openapi import STREAM_DESCRIPTION, document_server, operation_responses
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
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    LMStudioModel,
    LMStudioModelList,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    new_id,
    now,
)
from .response_store import ResponseStore
from .routes_responses import create_response
from .rows import Rows


def responses_of(route: Route) -> dict:
    """The `responses=` of a route's operation: 200's media types and each error status."""
    return operation_responses(route.errors, STREAM_DESCRIPTION.get(route.operation))


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

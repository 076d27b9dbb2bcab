"""HTTP routes: OpenAI's `/v1` API and LM Studio's `/api/v0`, over the engine.

A route validates (protocol.py), prepares (prepare.py: template, tokens, limits, grammar — in a
worker thread, so the event loop never blocks), submits to the engine, then either streams SSE
or collects the reply (output.py). A client that goes away cancels its request, which frees its
batch slot on the engine's next step. Every error leaves as `{"error": {...}}`; client mistakes
are 4xx, a full queue is 503, and only a bug in this package is a 500.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen3MLXError
from .engine import Channel, Engine, EngineBusy, Failed, Finished, GenerationRequest, Output
from .guard import (
    ORIGINAL_METHOD,
    ApiKeyGuard,
    BodyLimit,
    HostGuard,
    HostPolicy,
    PathNormalizer,
    error_body,
    error_response,
    has_api_key,
)
from .models import LoadedModel, ModelNotFound, ModelRegistry
from .output import (
    ChatCollector,
    ChatStreamer,
    CompletionCollector,
    ResponsesBuilder,
    completion_chunk,
    completion_finish,
    completion_response,
    dump,
    sse,
    stats_of,
    usage_of,
)
from .prepare import (
    ApiError,
    Limits,
    Prepared,
    prepare_chat,
    prepare_completion,
    responses_to_chat,
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
    ErrorResponse,
    LMStudioModel,
    LMStudioModelList,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    new_id,
    now,
)

log = logging.getLogger("qwen3_mlx.server")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Settings:
    """`bind_host`: the address the server listens on; with it, requests whose Host header is
    not loopback, that address or one of `allowed_hosts` get 403 (see guard.HostPolicy). The
    CLI always sets it; an app embedded elsewhere (or under TestClient) checks no Host."""

    api_key: str | None = None
    cors: bool = False
    max_tokens_limit: int | None = None
    max_body_bytes: int = 16 << 20
    bind_host: str | None = None
    allowed_hosts: tuple[str, ...] = ()


def create_app(
    registry: ModelRegistry, engine: Engine, settings: Settings | None = None
) -> FastAPI:
    settings = settings or Settings()
    limits = Limits(max_tokens=settings.max_tokens_limit)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        engine.close()

    app = FastAPI(
        title="qwen3-mlx",
        version="0.1.0",
        summary="Qwen3 on MLX: an OpenAI- and LM Studio-compatible server",
        lifespan=lifespan,
        # The docs UIs load their scripts from a CDN, which an offline machine can't reach.
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # PathNormalizer serves `/v1/models/` itself, no 307
    )
    app.state.engine = engine
    app.state.registry = registry

    # -- errors -----------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = (
                f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            )
        else:
            # Validators that see deeper than pydantic's loc (free-form objects) name the spot.
            if isinstance(first.get("ctx", {}).get("param"), str):
                loc = first["ctx"]["param"].split(".")
            where = ".".join(loc)
            text = str(first["msg"]).removeprefix("Value error, ")
            message = f"{where}: {text}" if where else text
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        method = request.scope.get(ORIGINAL_METHOD, request.method)
        message = {
            404: f"no such endpoint: {method} {request.url.path}",
            405: f"method {method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code
        )

    @app.exception_handler(ModelNotFound)
    async def on_model_not_found(request: Request, exc: ModelNotFound):
        return error_response(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(EngineBusy)
    async def on_busy(request: Request, exc: EngineBusy):
        return error_response(
            503, str(exc), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"}
        )

    @app.exception_handler(Qwen3MLXError)
    async def on_user_error(request: Request, exc: Qwen3MLXError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error"
        )

    # -- Host, paths, CORS, API key, body size (the last added runs first) ---------------------

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.api_key is not None:
        # Middleware rather than a route dependency: /openapi.json and unknown paths need the
        # key too. CORS runs before it, so browsers' preflights (which carry no key) pass.
        app.add_middleware(ApiKeyGuard, key=settings.api_key)
    if settings.cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(PathNormalizer)
    if settings.bind_host is not None:
        app.add_middleware(HostGuard, policy=HostPolicy(settings.bind_host, settings.allowed_hosts))

    v1 = APIRouter(prefix="/v1", responses=ERRORS)
    v0 = APIRouter(prefix="/api/v0", responses=ERRORS)

    # -- models -----------------------------------------------------------------------------

    def lmstudio_card(m: LoadedModel) -> LMStudioModel:
        return LMStudioModel(
            id=m.id,
            type=m.kind,
            publisher=m.publisher,
            arch=m.arch,
            quantization=m.quantization,
            max_context_length=m.context_length,
            capabilities=m.capabilities,
        )

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=m.id) for m in registry])

    @v1.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        return ModelCard(id=registry.get(model_id).id)

    @v0.get("/models", response_model=LMStudioModelList)
    async def list_models_v0():
        return LMStudioModelList(data=[lmstudio_card(m) for m in registry])

    @v0.get("/models/{model_id:path}", response_model=LMStudioModel)
    async def get_model_v0(model_id: str):
        return lmstudio_card(registry.get(model_id))

    # -- running a request ------------------------------------------------------------------

    def submit(prepared: Prepared) -> GenerationRequest:
        request = GenerationRequest(
            model=prepared.model, sequence=prepared.sequence, channel=Channel()
        )
        engine.submit(request)
        return request

    async def events(http: Request, request: GenerationRequest):
        """The request's engine events, up to Finished; cancels it if the client disconnects."""
        done = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(request.channel.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    done = True
                    raise ApiError(500, event.message)
                done = isinstance(event, Finished)
                yield event
                if done:
                    return
        finally:
            if not done:
                request.cancel()
                engine.wake()

    async def stream(
        http: Request, request: GenerationRequest, head: list[str], on_output, on_finish
    ):
        async def body():
            for line in head:
                yield line
            try:
                async for event in events(http, request):
                    lines = on_output(event.step) if isinstance(event, Output) else on_finish(event)
                    for line in lines:
                        yield line
            except ApiError as e:
                yield sse(error_body(e.message, type=e.type))

        def hang_up():
            # Runs after the response ends, also when Starlette cancels it because the client
            # left: the slot is freed even if the generators above are never resumed.
            if not request.sequence.finished:
                request.cancel()
                engine.wake()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(hang_up),
        )

    async def collect(http: Request, request: GenerationRequest, on_output) -> Finished:
        finished = None
        async for event in events(http, request):
            if isinstance(event, Output):
                on_output(event.step)
            else:
                finished = event
        if finished is None or finished.finish_reason == "abort":
            raise ApiError(499, "client disconnected")
        return finished

    def resolve(name: str | None) -> LoadedModel:
        return registry.get(name, kind="llm")

    # -- chat -------------------------------------------------------------------------------

    async def chat(http: Request, body: ChatCompletionRequest, lmstudio: bool):
        model = resolve(body.model)
        prepared = await run_in_threadpool(prepare_chat, body, model, limits)
        request = submit(prepared)
        id, created = new_id("chatcmpl"), now()
        if body.stream:
            streamer = ChatStreamer(
                id=id,
                created=created,
                model=model,
                lmstudio=lmstudio,
                want_logprobs=body.logprobs,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            return await stream(http, request, [streamer.start()], streamer.step, streamer.finish)
        collector = ChatCollector(model, body.logprobs)
        finished = await collect(http, request, collector.add)
        response = collector.response(
            id=id, created=created, model=model, finished=finished, lmstudio=lmstudio
        )
        return JSONResponse(dump(response))

    @v1.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(http: Request, body: ChatCompletionRequest):
        return await chat(http, body, lmstudio=False)

    @v0.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions_v0(http: Request, body: ChatCompletionRequest):
        return await chat(http, body, lmstudio=True)

    # -- text completions -------------------------------------------------------------------

    async def complete(http: Request, body: CompletionRequest, lmstudio: bool):
        model = resolve(body.model)
        prepared = await run_in_threadpool(prepare_completion, body, model, limits)
        request = submit(prepared)
        id, created = new_id("cmpl"), now()
        collector = CompletionCollector(model, body.logprobs is not None, body.logprobs or 0)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def on_output(step):
                piece = collector.add(step)
                if not step.text and piece is None:
                    return []
                return [
                    completion_chunk(
                        id=id, created=created, model=model, text=step.text, logprobs=piece
                    )
                ]

            def on_finish(f: Finished):
                out = [
                    completion_chunk(
                        id=id,
                        created=created,
                        model=model,
                        text="",
                        finish_reason=completion_finish(f),
                        stats=stats_of(f) if lmstudio else None,
                    )
                ]
                if include_usage:
                    out.append(
                        completion_chunk(
                            id=id,
                            created=created,
                            model=model,
                            text="",
                            usage=usage_of(f),
                            choices=False,
                        )
                    )
                return out + [sse("[DONE]")]

            head = []
            if body.echo and isinstance(body.prompt, str):
                head.append(completion_chunk(id=id, created=created, model=model, text=body.prompt))
            return await stream(http, request, head, on_output, on_finish)
        finished = await collect(http, request, collector.add)
        text = "".join(collector.text)
        if body.echo:
            text = model.tokenizer.decode(prepared.prompt) + text
        response = completion_response(
            id=id,
            created=created,
            model=model,
            text=text,
            logprobs=collector.logprobs,
            finished=finished,
            lmstudio=lmstudio,
        )
        return JSONResponse(dump(response))

    @v1.post("/completions", response_model=Completion)
    async def completions(http: Request, body: CompletionRequest):
        return await complete(http, body, lmstudio=False)

    @v0.post("/completions", response_model=Completion)
    async def completions_v0(http: Request, body: CompletionRequest):
        return await complete(http, body, lmstudio=True)

    # -- embeddings -------------------------------------------------------------------------

    async def embed(body: EmbeddingRequest):
        model = registry.get(body.model, kind="embeddings")
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
                tokens.append(
                    end
                )  # Qwen3-Embedding pools the hidden state of a final <|endoftext|>
            if len(tokens) > model.context_length:
                raise ApiError(
                    400,
                    f"input[{i}] is {len(tokens)} tokens but model '{model.id}' has a "
                    f"context of {model.context_length} tokens",
                    param="input",
                    code="context_length_exceeded",
                )
            batches.append(tokens)
        vectors = await engine.call(embed_tokens, model, batches, body.dimensions)
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

    @v1.post("/embeddings", response_model=EmbeddingList)
    async def embeddings(body: EmbeddingRequest):
        return await embed(body)

    @v0.post("/embeddings", response_model=EmbeddingList)
    async def embeddings_v0(body: EmbeddingRequest):
        return await embed(body)

    # -- responses API ----------------------------------------------------------------------

    @v1.post("/responses", response_model=ResponseObject)
    async def responses(http: Request, body: ResponsesRequest):
        if body.previous_response_id:
            raise ApiError(
                400,
                "previous_response_id is not supported: responses are not stored; "
                "send the whole conversation in 'input'",
                param="previous_response_id",
            )
        chat_body = responses_to_chat(body)
        model = resolve(chat_body.model)
        prepared = await run_in_threadpool(prepare_chat, chat_body, model, limits)
        request = submit(prepared)
        echo = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": prepared.params.temperature,
            "top_p": prepared.params.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": body.tool_choice or "auto",
            "tools": jsonable_encoder([t.model_dump(exclude_none=True) for t in body.tools or []]),
            "metadata": body.metadata,
        }
        builder = ResponsesBuilder(
            id=f"resp_{new_id('r')[2:]}", created=now(), model=model, request=echo
        )
        if body.stream:
            return await stream(
                http, request, builder.start(), builder.step, lambda f: builder.finish(f)[1]
            )
        for _ in builder.start():
            pass
        finished = await collect(http, request, builder.step)
        response, _ = builder.finish(finished)
        return JSONResponse(jsonable_encoder(response))

    # -- health -----------------------------------------------------------------------------

    @app.get("/health", include_in_schema=False)
    async def health(request: Request):
        status = {"status": "ok" if engine.alive else "engine stopped"}
        # Open for probes even with --api-key, but the load figures only for key holders.
        key = settings.api_key
        if key is not None and not has_api_key(request.scope["headers"], key):
            return status
        return {**status, **engine.stats()}

    app.include_router(v1)
    app.include_router(v0)
    return app


# -- embeddings (runs on the engine thread) -----------------------------------------------------


def embed_tokens(
    model: LoadedModel, batches: list[list[int]], dimensions: int | None
) -> list[np.ndarray]:
    """Last-token pooling of the final-normed hidden states, L2-normalised (Qwen3-Embedding)."""
    import mlx.core as mx

    out = []
    for tokens in batches:
        hidden = model.model.model(mx.array([tokens]))[0, -1].astype(mx.float32)
        if dimensions is not None:
            hidden = hidden[:dimensions]  # Matryoshka: a prefix of the vector is an embedding too
        hidden = hidden / mx.maximum(mx.linalg.norm(hidden), 1e-12)
        out.append(np.array(hidden))
    return out

"""The FastAPI app: OpenAI's `/v1` API, LM Studio's `/api/v0`, Anthropic's `/v1/messages` and
Ollama's `/api/chat`, `/api/generate`… over the engine.

Here: the app's settings, its error handlers (every error leaves as `{"error": {...}}`; client
mistakes are 4xx, a full queue or a model that can't be loaded now is 503, and only a bug in
this package is a 500), the middleware (Host, paths, CORS, API key, body size: guard.py; the
models a request holds: loader.HoldModels), /health and /metrics (metrics.py). The operations
and the table that serves them under both prefixes are in routes.py, Anthropic's Messages API
in routes_anthropic.py, Ollama's API in routes_ollama.py (whose errors leave in their API's
shape) and LM Studio's `/api/v1` in routes_lmstudio.py; a request's rows run through rows.py.
Models loaded on demand: catalog.py (what can be served) and loader.py (loads, TTL, eviction).
The chat page at `/` (unless --no-ui): ui.py and its files in ui/.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Qwen3MLXError
from .engine import Engine, EngineBusy
from .guard import (
    ORIGINAL_METHOD,
    ApiKeyGuard,
    BodyLimit,
    HostGuard,
    HostPolicy,
    PathNormalizer,
    error_response,
    has_api_key,
)
from .loader import HoldModels, LoadRefused, ModelLoader
from .metrics import ServerMetrics
from .models import ModelNotFound, ModelRegistry
from .prepare import ApiError
from .routes import Api, register
from .routes_anthropic import AnthropicErrors, register_anthropic
from .routes_lmstudio import register_lmstudio_v1
from .routes_ollama import OllamaErrors, register_ollama
from .routes_responses import register_responses
from .ui import PATHS as UI_PATHS
from .ui import register_ui

log = logging.getLogger("qwen3_mlx.server")


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
    reasoning_format: str = "separate"  # --reasoning-format: a request's reasoning_format wins
    responses_store_size: int = 512  # --responses-store-size: stored Responses API responses
    responses_max_age: float = 3600.0  # --responses-max-age: seconds one is kept
    mcp: Any = None  # --mcp-config: the started MCP servers (mcp_tools.McpHub), closed at exit
    ui: bool = True  # the chat page at / (--no-ui: off)


def create_app(
    registry: ModelRegistry,
    engine: Engine,
    settings: Settings | None = None,
    loader: ModelLoader | None = None,
) -> FastAPI:
    """`loader`: the models served on demand (default: the registry's, as they were loaded)."""
    settings = settings or Settings()
    loader = loader or ModelLoader.serving(registry, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        # The port opens after the warm-up: no request waits for a compile.
        await asyncio.to_thread(engine.ready.wait)
        yield
        engine.close()
        if settings.mcp is not None:
            await asyncio.to_thread(settings.mcp.close)

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
    app.state.loader = loader

    # -- errors -----------------------------------------------------------------------------

    documented: list[tuple[re.Pattern, set[str]]] = []

    def documented_methods(path: str) -> set[str]:
        """The methods /openapi.json lists for `path`."""
        if not documented:
            for template, operations in app.openapi().get("paths", {}).items():
                pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
                documented.append((re.compile(pattern + "$"), {m.upper() for m in operations}))
        return {m for pattern, methods in documented if pattern.match(path) for m in methods}

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
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path; one path
            # that several routes serve (GET and DELETE /v1/responses/{id}) allows them all.
            allowed = set((headers or {}).get("Allow", "").replace(" ", "").split(",")) - {""}
            allowed |= documented_methods(request.url.path)
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response(exc.status_code, message, headers=headers)

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

    @app.exception_handler(LoadRefused)
    async def on_load_refused(request: Request, exc: LoadRefused):
        return error_response(
            503, str(exc), type="server_overloaded", code=exc.code, headers={"Retry-After": "5"}
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
        # The chat page's files are open: the page asks for the key and sends it itself.
        open_paths = ("/health", *(UI_PATHS if settings.ui else ()))
        app.add_middleware(ApiKeyGuard, key=settings.api_key, open_paths=open_paths)
    if settings.cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(PathNormalizer)
    if settings.bind_host is not None:
        app.add_middleware(HostGuard, policy=HostPolicy(settings.bind_host, settings.allowed_hosts))
    # Outermost: every error on Anthropic's and Ollama's paths, the guards' too, leaves in that
    # API's shape.
    app.add_middleware(AnthropicErrors)
    app.add_middleware(OllamaErrors)
    # A request holds the models it names until its response (a stream too) has been sent.
    app.add_middleware(HoldModels, loader=loader)

    api = Api(registry, engine, settings, loader)
    register(app, api)
    register_anthropic(app, api)
    register_responses(app, api)
    register_ollama(app, api)
    register_lmstudio_v1(app, api)
    if settings.ui:
        register_ui(app)

    metrics = ServerMetrics(engine, registry)
    engine.on_finished = metrics.finished

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # -- health -----------------------------------------------------------------------------

    @app.get("/health", include_in_schema=False)
    async def health(request: Request):
        state = engine.health()
        body = {"status": state}
        # Open for probes even with --api-key, but the load figures only for key holders.
        key = settings.api_key
        if key is None or has_api_key(request.scope["headers"], key):
            body.update(engine.stats())
            if state != "ok" and engine.last_error:
                body["last_error"] = engine.last_error
        # A probe or load balancer reads the status code: 503 while requests can't be served.
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    return app

"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A message request is translated into the chat completion request it amounts to
(anthropic_input), then runs the chat route's path: `prepare_chat` (template, tokens, limits,
sampling, tool grammar, thinking budget), the engine, and output.anthropic for the reply. Token
counting prepares the same way and reports the prompt's length, so it is the count a real
request's prompt has.

Errors on these paths, whoever raises them (the API key and Host guards, the body limit,
validation, the handlers), leave in Anthropic's shape (`AnthropicErrors`). `anthropic-version`
and `anthropic-beta` headers are accepted and not read.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .anthropic_input import anthropic_to_chat
from .output.anthropic import MessageBuilder, error_body, error_event
from .prepare import prepare_chat
from .protocol import new_id
from .protocol.anthropic import (
    AnthropicErrorResponse,
    AnthropicMessage,
    AnthropicTokenCount,
    CountTokensRequest,
    MessagesRequest,
)
from .routes import ERROR_HEADERS, ERRORS, GUARDED, Api

PREFIX = "/v1/messages"

STREAM_DESCRIPTION = (
    "With `stream: true`: server-sent events `event: <type>` / `data: <event>`: message_start, "
    "ping, then per content block content_block_start, content_block_delta (text_delta, "
    "thinking_delta, signature_delta, input_json_delta) and content_block_stop, then "
    "message_delta (stop_reason, usage) and message_stop. An error after the stream began is "
    "an `error` event."
)


# Anthropic's error object names no field (`error.message` does), and a request has one row.
INVALID = (
    "Invalid request (`invalid_request_error`): a field fails validation, or the request can't "
    "be served as asked (a prompt longer than the model's context, `max_tokens` over "
    "--max-tokens-limit, an image or document block…)."
)


def is_anthropic(path: str) -> bool:
    path = path.rstrip("/")
    return path == PREFIX or path.startswith(PREFIX + "/")


def responses_of(errors: tuple[int, ...], stream: bool) -> dict:
    """The `responses=` of an operation: 200's media types and each error status."""
    out: dict = {}
    if stream:
        out[200] = {
            "description": "The message (JSON), or with `stream: true` a stream of events.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": STREAM_DESCRIPTION,
                        "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                        "required": ["data"],
                    }
                }
            },
        }
    for code in sorted({*GUARDED, *errors}):
        described = INVALID if code == 400 else ERRORS[code]
        out[code] = {"model": AnthropicErrorResponse, "description": described}
        if code in ERROR_HEADERS:
            out[code]["headers"] = ERROR_HEADERS[code]
    return out


class AnthropicApi:
    def __init__(self, api: Api):
        self.api = api

    async def messages(self, http: Request, body: MessagesRequest):
        chat = anthropic_to_chat(body)
        model = self.api.resolve(chat.model)
        prepared = await run_in_threadpool(prepare_chat, chat, model, self.api.limits)
        running = self.api.start(model, [[prepared.sequence]])
        display = getattr(body.thinking, "display", None)
        builder = MessageBuilder(
            id=f"msg_{new_id('m')[2:]}",
            model=model,
            prompt_tokens=len(prepared.prompt),
            streaming=body.stream,
            show_thinking=display != "omitted",
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
        return JSONResponse(builder.message())

    async def count_tokens(self, body: CountTokensRequest):
        chat = anthropic_to_chat(body)
        model = self.api.resolve(chat.model)
        prepared = await run_in_threadpool(prepare_chat, chat, model, self.api.limits)
        return AnthropicTokenCount(input_tokens=len(prepared.prompt))


def register_anthropic(app: FastAPI, api: Api) -> None:
    handlers = AnthropicApi(api)
    router = APIRouter(prefix=PREFIX)
    router.add_api_route(
        "",
        handlers.messages,
        methods=["POST"],
        response_model=AnthropicMessage,
        responses=responses_of((400, 404, 503), stream=True),
        name="anthropic_messages",
    )
    router.add_api_route(
        "/count_tokens",
        handlers.count_tokens,
        methods=["POST"],
        response_model=AnthropicTokenCount,
        responses=responses_of((400, 404), stream=False),
        name="anthropic_count_tokens",
    )
    app.include_router(router)


class AnthropicErrors:
    """Rewrite the JSON error responses (`{"error": {...}}`, status ≥ 400) of Anthropic's paths
    into Anthropic's shape, `{"type": "error", "error": {"type": ..., "message": ...}}`. The
    outermost middleware, so guards' refusals are reshaped too; streams (200) pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_anthropic(scope["path"]):
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def reshape(message):
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    held = message
                    return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            reshaped = _reshaped(held["status"], body)
            headers = held.get("headers") or []
            if reshaped is not None:
                body = reshaped
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


def _reshaped(status: int, body: bytes) -> bytes | None:
    """The body in Anthropic's shape; None if it is no error object (a HEAD's empty body)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    reshaped = error_body(status, message)
    return json.dumps(reshaped, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

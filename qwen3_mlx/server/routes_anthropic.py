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

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .anthropic_input import anthropic_to_chat
from .guard import ErrorReshaper
from .openapi import operation_responses
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
from .routes import Api

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
    return operation_responses(
        errors,
        STREAM_DESCRIPTION if stream else None,
        reply="The message",
        error_model=AnthropicErrorResponse,
        described={400: INVALID},
    )


class AnthropicApi:
    def __init__(self, api: Api):
        self.api = api

    async def messages(self, http: Request, body: MessagesRequest):
        chat = anthropic_to_chat(body)
        model = await self.api.load(chat.model)
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
        return await running.reply(http, builder, body.stream, builder.message, error_event)

    async def count_tokens(self, body: CountTokensRequest):
        chat = anthropic_to_chat(body)
        model = await self.api.load(chat.model)
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


class AnthropicErrors(ErrorReshaper):
    """Errors on Anthropic's paths in Anthropic's shape,
    `{"type": "error", "error": {"type": ..., "message": ...}}`."""

    def matches(self, path: str) -> bool:
        return is_anthropic(path)

    def reshape(self, status: int, message: str) -> dict:
        return error_body(status, message)

"""What /openapi.json says: every operation's replies and error statuses, and the bounds this
server runs with (`x-server-limit` in the schemas, filled in when the document is made)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from .protocol import MAX_CHOICES, SEED_MAX, SEED_MIN, SERVER_LIMIT, ErrorResponse, digits_up_to

if TYPE_CHECKING:
    from .routes import Api

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

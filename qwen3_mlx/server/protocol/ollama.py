"""Ollama's native API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`): the requests, the records a reply is made of, the model listings, and Ollama's
error object (`{"error": "message"}`).

Requests are strict as the other APIs' are (a `"temperature": "hot"` is a 400), and keep the
fields they don't know without reading them. `options` types the knobs this server applies with
the bounds chat gives them; Ollama's other options (`num_gpu`, `mirostat`, `num_thread`…) are
accepted and not read, as Ollama itself warns about and skips an option it doesn't know. Images
are parsed only to be refused by name (a text-only model), so they are left out of the OpenAPI
document.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from .chat import ChatTool
from .common import (
    INT32_MAX,
    SERVER_LIMIT,
    TEXT_SCHEMA,
    Integer,
    Open,
    Penalty,
    Probability,
    Request,
    Schema,
    integer,
    json_schema,
    model_name,
    nullable,
)
from .sampling import MAX_STOP, MIN_REPETITION_PENALTY, SEED_MAX, SEED_MIN

# -- requests ----------------------------------------------------------------------------------

# A Go duration ("5m", "1h30m", "-1s", "0"), what Ollama's `keep_alive` string must parse as.
GO_DURATION = r"^[-+]?(0|([0-9]*(\.[0-9]*)?(ns|us|µs|μs|ms|s|m|h))+)$"
THINK_LEVELS = ("low", "medium", "high")


class OllamaOptions(Open):
    """The options this server applies; the others are accepted and not read."""

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_k: integer(-1, INT32_MAX) | None = None
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    min_p: Probability | None = None
    num_predict: integer(-2, INT32_MAX) | None = Field(
        None,
        **json_schema(
            nullable(
                {
                    "anyOf": [
                        {"type": "integer", "minimum": 1, SERVER_LIMIT: "max-tokens"},
                        {"type": "integer", "enum": [-1, -2]},
                    ]
                }
            ),
            description="Most tokens to generate, thinking included (at most the server's "
            "--max-tokens-limit, if it has one); -1, -2 or left out: until the context is full "
            "(or that limit).",
        ),
    )
    num_ctx: integer(1, INT32_MAX) | None = Field(
        None,
        description="Accepted, not applied: the context is the model's (--context-length), "
        "so a larger value is no error and a smaller one truncates nothing.",
    )
    stop: list[str] | None = Field(
        None,
        **json_schema(
            nullable({"type": "array", "items": TEXT_SCHEMA, "maxItems": MAX_STOP}),
            description=f"Up to {MAX_STOP} non-empty strings that end generation.",
        ),
    )
    seed: integer(SEED_MIN, SEED_MAX) | None = Field(
        None,
        json_schema_extra=lambda schema: schema["anyOf"][0].update({SERVER_LIMIT: "seed"}),
    )
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10.0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, v):
        if v == 0:
            raise ValueError("num_predict must be positive (or -1 / -2: until the context ends)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if v and any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v


Format = Literal["", "json"] | dict[str, Any]
Think = bool | Literal["low", "medium", "high"]


class GenerateFields(Request):
    """What `/api/chat` and `/api/generate` share."""

    # Another kind's model (an embedding model) is a 400, also named `name:latest`.
    model: str = Field(min_length=1, json_schema_extra=model_name("ollama-llm"))
    format: Format | None = Field(
        None,
        description='"json" (any JSON object) or a JSON Schema the reply must match, '
        'enforced by constrained decoding after the thinking; "" or null: free text.',
    )
    options: OllamaOptions | None = None
    stream: bool = Field(True, description="Ollama streams unless this is false.")
    think: Think | None = Field(
        None,
        description="true/false: Qwen3 thinks or not; 'low' / 'medium' / 'high': it thinks "
        "within that budget (the server's reasoning_effort budgets). Left out: it thinks, as "
        "Ollama does for a thinking model.",
    )
    keep_alive: float | str | None = Field(
        None,
        description="The model's idle TTL: seconds, or a duration ('5m'); 0: unloaded when this "
        'request ends (with nothing to generate: at once, `done_reason: "unload"`); '
        "negative: it stays loaded. Left out: the model's own (--ttl if loaded on demand).",
        json_schema_extra=lambda schema: schema["anyOf"][1].update(pattern=GO_DURATION),
    )

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v):
        if isinstance(v, str) and not re.fullmatch(GO_DURATION, v):
            raise ValueError(f"{v!r} is not a duration (e.g. '5m', '1h', '-1' as a number)")
        return v


class OllamaFunction(Open):
    name: str
    # Ollama sends an object; a JSON string (OpenAI's way) is taken too.
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    index: Integer | None = None


class OllamaToolCall(Open):
    id: str | None = None
    function: OllamaFunction


class OllamaMessage(Open):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # the tool whose result a `tool` message carries
    tool_call_id: str | None = None
    images: SkipJsonSchema[list[Any] | None] = None  # refused when not empty


class OllamaChatRequest(GenerateFields):
    messages: list[OllamaMessage] = Field(
        default_factory=list,
        description="The conversation; empty: nothing is generated (Ollama's way to load a "
        'model, or with `keep_alive: 0` to unload it), the reply says `done_reason: "load"` '
        '(or "unload").',
    )
    tools: list[ChatTool] | None = None


class OllamaGenerateRequest(GenerateFields):
    prompt: str | None = Field(
        None,
        description='Empty or left out: nothing is generated (`done_reason: "load"`, or '
        '"unload" with `keep_alive: 0`).',
    )
    system: str | None = None
    template: str | None = Field(
        None,
        description="A Go template of the prompt, of which `{{ .System }}`, `{{ .Prompt }}`, "
        "`{{ .Response }}` (the prompt ends there), `{{ if .System }}…{{ else }}…{{ end }}` "
        "and `{{- … -}}` are served; it replaces the chat template, as `raw` does.",
    )
    raw: bool | None = Field(
        None, description="The prompt as is, no template; the reply's text as the model wrote it."
    )
    suffix: str | None = Field(
        None, description="Refused when not empty: Qwen3 has no fill-in-the-middle."
    )
    context: list[Integer] | None = Field(
        None, description="Refused when not empty (deprecated by Ollama): use /api/chat."
    )
    images: SkipJsonSchema[list[Any] | None] = None


class OllamaShowRequest(Request):
    model: str = Field(min_length=1)
    verbose: bool | None = None


# -- replies -----------------------------------------------------------------------------------


class OllamaCallFunction(Schema):
    index: int
    name: str
    arguments: dict[str, Any]  # an object, never a string (OpenAI's way)


class OllamaCall(Schema):
    id: str
    function: OllamaCallFunction


class OllamaReplyMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[OllamaCall] | None = None


class _Head(Schema):
    model: str
    created_at: str


class _Done(Schema):
    """What the final record (`done: true`) adds: why, and the timings in nanoseconds."""

    done: bool = False
    done_reason: Literal["stop", "length", "load", "unload"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class _ChatHead(_Head):
    message: OllamaReplyMessage = Field(default_factory=OllamaReplyMessage)


class _GenerateHead(_Head):
    response: str = ""
    thinking: str | None = None


# `_Done` first among the bases: its fields come last, as in Ollama's records.
class OllamaChatRecord(_Done, _ChatHead):
    """A record of `/api/chat`'s reply."""


class OllamaGenerateRecord(_Done, _GenerateHead):
    """A record of `/api/generate`'s reply."""


OllamaRecord = OllamaChatRecord | OllamaGenerateRecord


class OllamaModelDetails(Schema):
    parent_model: str = ""
    format: str = "mlx"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModelEntry(Schema):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaModelList(Schema):
    models: list[OllamaModelEntry]


class OllamaRunningModel(Schema):
    name: str
    model: str
    size: int
    digest: str
    details: OllamaModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class OllamaRunningList(Schema):
    models: list[OllamaRunningModel]


Capability = Literal["completion", "tools", "thinking", "embedding"]


class OllamaShowResponse(Schema):
    license: str = ""
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[Capability]
    modified_at: str


class OllamaVersion(Schema):
    version: str


class OllamaErrorResponse(Schema):
    error: str

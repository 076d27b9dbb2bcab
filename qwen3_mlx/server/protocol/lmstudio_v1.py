"""LM Studio 0.4's native REST API (`/api/v1`): chat, the model list, load and unload.

Imported from this module (not re-exported by the package): its names (`V1Model`, `V1Stats`…)
belong to this API alone. `integrations` name MCP servers of the server's --mcp-config (`"mcp/<name>"`
or a plugin object with `allowed_tools`), whose tools the server runs (mcp_loop.py). What this
server doesn't do is refused by the schema with a message: per-request (`ephemeral_mcp`) MCP
servers, stateful chats (`previous_response_id`: this server keeps no chats, so a reply carries
no `response_id`) and image input (a text-only model).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from .common import (
    INT32_MAX,
    Probability,
    Request,
    RequestPart,
    Schema,
    integer,
    json_schema,
    max_tokens_schema,
    model_name,
)
from .sampling import MIN_REPETITION_PENALTY, TTL_DESCRIPTION

Reasoning = Literal["off", "low", "medium", "high", "on"]
REASONING_OPTIONS: list[Reasoning] = ["off", "on", "low", "medium", "high"]

# -- requests ----------------------------------------------------------------------------------


class V1TextInput(RequestPart):
    type: Literal["message", "text"]
    content: str


class V1ImageInput(RequestPart):
    type: Literal["image"]
    data_url: str


# Image items are parsed, to be refused with a message naming them (a text-only model), and left
# out of the OpenAPI document: only text items are accepted.
V1InputItem = Annotated[V1TextInput | SkipJsonSchema[V1ImageInput], Field(discriminator="type")]


class V1PluginIntegration(RequestPart):
    type: Literal["plugin"]
    id: str = Field(description='A server of --mcp-config: "mcp/<name>".')
    allowed_tools: list[str] | None = Field(None, description="Default: all its tools.")


class V1EphemeralMcp(RequestPart):
    # Parsed to be refused with a message: tools come only from the servers started with the
    # server (--mcp-config), never from a URL a request names.
    type: Literal["ephemeral_mcp"]


V1Integration = (
    str
    | Annotated[V1PluginIntegration | SkipJsonSchema[V1EphemeralMcp], Field(discriminator="type")]
)


class V1ChatRequest(Request):
    model: str = Field(json_schema_extra=model_name("llm"))
    input: str | list[V1InputItem] = Field(
        description="The user's message: text, or text items (images are refused: a "
        "text-only model)."
    )
    system_prompt: str | None = None
    integrations: list[V1Integration] | None = Field(
        None,
        description="MCP servers of the server's --mcp-config whose tools the server runs: "
        '"mcp/<name>", or {"type": "plugin", "id": "mcp/<name>", "allowed_tools": [...]}. '
        "Per-request (ephemeral_mcp) servers are not supported.",
    )
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: integer(-1, INT32_MAX) | None = None
    min_p: Probability | None = None
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10.0)
    max_output_tokens: integer(1, INT32_MAX) | None = Field(
        None,
        **json_schema(
            max_tokens_schema(minus_one=False),
            description="Most tokens to generate (at most the server's --max-tokens-limit).",
        ),
    )
    reasoning: Reasoning | None = Field(
        None,
        description="Qwen3's thinking: 'off', 'on' (no budget), or 'low' / 'medium' / 'high' "
        "(on, with reasoning_effort's budgets). Left out: on.",
    )
    context_length: integer(1, INT32_MAX) | None = Field(
        None, description="The context length the model gets if this request loads it."
    )
    store: bool = Field(
        True, description="Accepted; chats are not stored (replies carry no response_id)."
    )
    previous_response_id: None = Field(
        None, description="Stateful chats are not supported: send the message alone."
    )
    ttl: integer(0, INT32_MAX) | None = Field(None, description=TTL_DESCRIPTION)

    @field_validator("integrations")
    @classmethod
    def _no_ephemeral(cls, v):
        if any(isinstance(item, V1EphemeralMcp) for item in v or ()):
            raise ValueError(
                "per-request (ephemeral_mcp) MCP servers are not supported: add the server to "
                'the server\'s --mcp-config and name it as "mcp/<name>"'
            )
        return v

    @field_validator("previous_response_id", mode="before")
    @classmethod
    def _stateless(cls, v):
        if v is not None:
            raise ValueError(
                "stateful chats are not supported: this server stores no chats (send the "
                "message without previous_response_id)"
            )
        return v


class V1LoadRequest(Request):
    model: str
    context_length: integer(1, INT32_MAX) | None = None
    # LM Studio applies these to llama.cpp models only (as it ignores them for MLX): accepted.
    eval_batch_size: integer(1, INT32_MAX) | None = None
    flash_attention: bool | None = None
    num_experts: integer(1, INT32_MAX) | None = None
    offload_kv_cache_to_gpu: bool | None = None
    echo_load_config: bool = False
    ttl: integer(0, INT32_MAX) | None = Field(
        None, description="Idle seconds before the model is unloaded (default: it stays)."
    )


class V1UnloadRequest(Request):
    instance_id: str


# -- the model list ----------------------------------------------------------------------------


class V1Quantization(Schema):
    name: str | None = None
    bits_per_weight: float | None = None


class V1InstanceConfig(Schema):
    context_length: int
    parallel: int | None = None  # rows decoded together (--max-concurrency)


class V1LoadedInstance(Schema):
    id: str
    config: V1InstanceConfig


class V1ReasoningOptions(Schema):
    allowed_options: list[Reasoning]
    default: Reasoning


class V1Capabilities(Schema):
    vision: bool = False
    trained_for_tool_use: bool = True
    reasoning: V1ReasoningOptions | None = None


class V1Model(Schema):
    type: Literal["llm", "embedding"]
    publisher: str
    key: str
    display_name: str
    architecture: str | None = None
    quantization: V1Quantization | None = None
    size_bytes: int
    params_string: str | None = None
    loaded_instances: list[V1LoadedInstance]
    max_context_length: int
    format: Literal["mlx"] = "mlx"
    capabilities: V1Capabilities | None = None


class V1ModelList(Schema):
    models: list[V1Model]


class V1LoadConfig(Schema):
    context_length: int


class V1LoadResponse(Schema):
    type: Literal["llm", "embedding"]
    instance_id: str
    load_time_seconds: float
    status: Literal["loaded"] = "loaded"
    load_config: V1LoadConfig | None = None


class V1UnloadResponse(Schema):
    instance_id: str


# -- chat replies ------------------------------------------------------------------------------


class V1MessageOutput(Schema):
    type: Literal["message"] = "message"
    content: str


class V1ReasoningOutput(Schema):
    type: Literal["reasoning"] = "reasoning"
    content: str


class V1ProviderInfo(Schema):
    type: Literal["plugin"] = "plugin"
    plugin_id: str  # "mcp/<name>"


class V1ToolCallOutput(Schema):
    """A tool call the server ran: its result (or its error's message) in `output`."""

    type: Literal["tool_call"] = "tool_call"
    tool: str
    arguments: dict[str, Any]
    output: str
    provider_info: V1ProviderInfo


V1OutputItem = Annotated[
    V1MessageOutput | V1ReasoningOutput | V1ToolCallOutput, Field(discriminator="type")
]


class V1Stats(Schema):
    input_tokens: int
    total_output_tokens: int
    reasoning_output_tokens: int
    tokens_per_second: float
    time_to_first_token_seconds: float
    model_load_time_seconds: float | None = None  # only when this request loaded the model


class V1ChatResponse(Schema):
    model_instance_id: str
    output: list[V1OutputItem]
    stats: V1Stats
    response_id: str | None = None  # never set: chats are not stored


# -- streamed events (`event: <type>` / `data: <event>`) -----------------------------------------


class V1ChatStart(Schema):
    type: Literal["chat.start"] = "chat.start"
    model_instance_id: str


class V1ModelLoadStart(Schema):
    type: Literal["model_load.start"] = "model_load.start"
    model_instance_id: str


class V1ModelLoadEnd(Schema):
    type: Literal["model_load.end"] = "model_load.end"
    model_instance_id: str
    load_time_seconds: float


class V1Marker(Schema):
    type: Literal[
        "prompt_processing.start",
        "prompt_processing.end",
        "reasoning.start",
        "reasoning.end",
        "message.start",
        "message.end",
    ]


class V1Delta(Schema):
    type: Literal["reasoning.delta", "message.delta"]
    content: str


class V1ToolCallStart(Schema):
    type: Literal["tool_call.start"] = "tool_call.start"
    tool: str
    provider_info: V1ProviderInfo


class V1ToolCallArguments(Schema):
    type: Literal["tool_call.arguments"] = "tool_call.arguments"
    tool: str
    arguments: dict[str, Any]
    provider_info: V1ProviderInfo


class V1ToolCallSuccess(Schema):
    type: Literal["tool_call.success"] = "tool_call.success"
    tool: str
    arguments: dict[str, Any]
    output: str
    provider_info: V1ProviderInfo


class V1ToolCallFailure(Schema):
    type: Literal["tool_call.failure"] = "tool_call.failure"
    reason: str
    metadata: dict[str, Any]


class V1ErrorDetail(Schema):
    type: str  # invalid_request, model_not_found, internal_error…
    message: str
    code: str | None = None
    param: str | None = None


class V1ErrorEvent(Schema):
    type: Literal["error"] = "error"
    error: V1ErrorDetail


class V1ChatEnd(Schema):
    type: Literal["chat.end"] = "chat.end"
    result: V1ChatResponse


V1Event = (
    V1ChatStart
    | V1ModelLoadStart
    | V1ModelLoadEnd
    | V1Marker
    | V1Delta
    | V1ToolCallStart
    | V1ToolCallArguments
    | V1ToolCallSuccess
    | V1ToolCallFailure
    | V1ErrorEvent
    | V1ChatEnd
)

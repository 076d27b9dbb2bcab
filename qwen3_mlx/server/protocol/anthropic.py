"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): the request, its
content blocks, the message it answers with, the events of a streamed one, and its error object.

Requests are strict as the other APIs' are, and keep fields they don't know (`cache_control`,
`citations`, vendor extras) without reading them. Which blocks a message may hold depends on its
role (a user sends text and tool results; an assistant text, tool uses and thinking), which the
schema says by discriminating messages on `role`. Image and document blocks are parsed only to
be refused by name (a text-only model), so they are left out of the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .common import (
    INT32_MAX,
    SERVER_LIMIT,
    TEXT_SCHEMA,
    TOOL_PARAMETERS_SCHEMA,
    Open,
    Request,
    RequestPart,
    Schema,
    integer,
    json_schema,
    model_name,
    nullable,
    tool_parameters,
)
from .sampling import MAX_STOP

# -- content blocks ----------------------------------------------------------------------------


class AnthropicText(Open):
    type: Literal["text"]
    text: str


class AnthropicMedia(Open):
    type: Literal["image", "document", "search_result", "container_upload"]


ToolResultPart = Annotated[
    AnthropicText | SkipJsonSchema[AnthropicMedia], Field(discriminator="type")
]


class AnthropicToolResult(Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultPart] = ""
    is_error: bool | None = None


class AnthropicToolUse(Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicThinking(Open):
    # The signature is ours, echoed back by the client; it is not checked.
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class AnthropicRedactedThinking(Open):
    type: Literal["redacted_thinking"]
    data: str


UserBlock = Annotated[
    AnthropicText | AnthropicToolResult | SkipJsonSchema[AnthropicMedia],
    Field(discriminator="type"),
]
AssistantBlock = Annotated[
    AnthropicText | AnthropicToolUse | AnthropicThinking | AnthropicRedactedThinking,
    Field(discriminator="type"),
]


class AnthropicUserMessage(Open):
    role: Literal["user"]
    content: str | list[UserBlock]


class AnthropicAssistantMessage(Open):
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


AnthropicMessageParam = Annotated[
    AnthropicUserMessage | AnthropicAssistantMessage, Field(discriminator="role")
]


# -- tools, tool choice, thinking ----------------------------------------------------------------


class AnthropicTool(RequestPart):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] = Field(
        **json_schema(TOOL_PARAMETERS_SCHEMA, description="A JSON Schema of the tool's input.")
    )
    # Server tools (web search, code execution…) carry their own type and run at Anthropic.
    type: Literal["custom"] | None = None

    _input_schema = field_validator("input_schema")(tool_parameters)


class ToolChoiceAuto(RequestPart):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(RequestPart):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(RequestPart):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(RequestPart):
    type: Literal["none"]


AnthropicToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class ThinkingEnabled(RequestPart):
    type: Literal["enabled"]
    budget_tokens: integer(1, INT32_MAX) = Field(
        description="Most tokens the model thinks for before `</think>` is forced (Anthropic "
        "asks for 1,024 or more; any positive budget is served here)."
    )
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(RequestPart):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(RequestPart):
    type: Literal["disabled"]


AnthropicThinkingConfig = Annotated[
    ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")
]


class AnthropicMetadata(Open):
    user_id: str | None = None


# -- the requests ------------------------------------------------------------------------------


class CountTokensRequest(Request):
    """What makes the prompt: `/v1/messages/count_tokens` takes this much of a message request."""

    # `_consistent` below as JSON Schema: 'any' or a named tool needs `tools` (naming one of
    # them is said in words only).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {
                    "properties": {
                        "tool_choice": {
                            "anyOf": [
                                {"type": "null"},
                                {"properties": {"type": {"enum": ["auto", "none"]}}},
                            ]
                        }
                    }
                },
                {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]},
            ]
        }
    )

    model: str = Field(json_schema_extra=model_name("llm"))
    messages: list[AnthropicMessageParam] = Field(min_length=1)
    system: str | list[AnthropicText] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = Field(
        None, description="'any' or a named tool needs `tools`; a named one must be in them."
    )
    thinking: AnthropicThinkingConfig | None = Field(
        None,
        description="'enabled' (with a budget) or 'adaptive': Qwen3 thinks, and the reply "
        "holds thinking blocks; 'disabled' or left out: it answers without thinking "
        "(unless the conversation says /think).",
    )

    @model_validator(mode="after")
    def _consistent(self):
        choice, names = self.tool_choice, [t.name for t in self.tools or []]
        if isinstance(choice, ToolChoiceAny | ToolChoiceTool) and not names:
            raise ValueError(f"tool_choice '{choice.type}' needs a non-empty 'tools' list")
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise ValueError(
                f"tool_choice names tool {choice.name!r}, which is not in tools "
                f"({', '.join(names)})"
            )
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: integer(1, INT32_MAX) = Field(
        **json_schema(
            {"type": "integer", "minimum": 1, "maximum": INT32_MAX, SERVER_LIMIT: "max-tokens"},
            description="Most tokens to generate, thinking included (at most the server's "
            "--max-tokens-limit, if it has one).",
        )
    )
    stop_sequences: list[str] | None = Field(
        None,
        **json_schema(
            nullable({"type": "array", "items": TEXT_SCHEMA, "maxItems": MAX_STOP}),
            description=f"Up to {MAX_STOP} non-empty strings that end generation "
            '(`stop_reason: "stop_sequence"`).',
        ),
    )
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: integer(0, INT32_MAX) | None = None
    metadata: AnthropicMetadata | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stop_sequences(cls, v):
        if v and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if v and any(not s for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v


# -- the reply ---------------------------------------------------------------------------------


class TextBlock(Schema):
    type: Literal["text"] = "text"
    text: str = ""


class ThinkingBlock(Schema):
    type: Literal["thinking"] = "thinking"
    thinking: str = ""
    signature: str = ""


class ToolUseBlock(Schema):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ContentBlock = Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(Schema):
    # Anthropic's input_tokens leaves out the tokens read from the cache (counted apart).
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class AnthropicMessage(Schema):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock] = Field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicTokenCount(Schema):
    input_tokens: int


class AnthropicErrorDetail(Schema):
    type: str
    message: str


class AnthropicErrorResponse(Schema):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


# -- streamed events (each one's `type` is also its SSE event name) ----------------------------


class MessageStartEvent(Schema):
    type: Literal["message_start"] = "message_start"
    message: AnthropicMessage


class PingEvent(Schema):
    type: Literal["ping"] = "ping"


class ContentBlockStartEvent(Schema):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(Schema):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(Schema):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(Schema):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


class InputJsonDelta(Schema):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


BlockDelta = Annotated[
    TextDelta | ThinkingDelta | SignatureDelta | InputJsonDelta, Field(discriminator="type")
]


class ContentBlockDeltaEvent(Schema):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: BlockDelta


class ContentBlockStopEvent(Schema):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(Schema):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaEvent(Schema):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: AnthropicUsage  # totals for the whole message, not increments


class MessageStopEvent(Schema):
    type: Literal["message_stop"] = "message_stop"


class ErrorEvent(AnthropicErrorResponse):
    """An error after the stream began (its SSE event name is `error`)."""


AnthropicEvent = (
    MessageStartEvent
    | PingEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | ErrorEvent
)

"""`/v1/chat/completions`: tools, messages, the request, the reply and its streamed chunks."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from .common import (
    INT32_MAX,
    TOOL_PARAMETERS_SCHEMA,
    Open,
    RequestPart,
    Schema,
    Usage,
    integer,
    json_schema,
    max_tokens_schema,
    nullable,
    tool_parameters,
)
from .lmstudio import ModelInfo, Runtime, Stats
from .mcp import MCP_DESCRIPTION, McpCall, McpSelection, ToolResultDelta
from .sampling import ResponseFormat, SamplingFields

# -- tools -------------------------------------------------------------------------------------


class FunctionDefinition(RequestPart):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        **json_schema(
            nullable(TOOL_PARAMETERS_SCHEMA),
            description="A JSON Schema of the arguments object ({} or null: none).",
        ),
    )
    strict: bool | None = None

    _parameters = field_validator("parameters")(tool_parameters)


class ChatTool(RequestPart):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# -- messages ----------------------------------------------------------------------------------


class TextPart(Open):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ImagePart(Open):
    type: Literal["image_url", "input_image", "image", "input_audio", "file"]


# Image, audio and file parts are parsed (to be refused with a message naming them: this is a
# text-only model), so they are left out of the OpenAPI document: only text parts are accepted.
ContentPart = Annotated[TextPart | SkipJsonSchema[ImagePart], Field(discriminator="type")]


class FunctionCall(Open):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


# -- the request -------------------------------------------------------------------------------


# Names `render_chat` (template.py) and jinja's `Template.render` take as their own arguments:
# prepare.py passes chat_template_kwargs beside them, so one of these would be given twice.
# (`enable_thinking` is not here: prepare.py takes it out of the kwargs and honours it.)
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "chat_template", "documents", "self"}
)


class ChatCompletionRequest(SamplingFields):
    # `_consistent` below and the max_tokens rule, as far as JSON Schema can say them (a named
    # tool_choice must also name a function of `tools`, which it can't). Each is an `anyOf` of
    # spelled-out cases rather than an if/then (whose `not` schemathesis can't always generate).
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                # max_completion_tokens wins: max_tokens beside it is not held to the limit.
                {
                    "anyOf": [
                        {
                            "properties": {"max_completion_tokens": {"type": "integer"}},
                            "required": ["max_completion_tokens"],
                        },
                        {
                            "properties": {
                                "max_completion_tokens": {"type": "null"},
                                "max_tokens": max_tokens_schema(),
                            }
                        },
                    ]
                },
                # top_logprobs needs logprobs: true
                {
                    "anyOf": [
                        {
                            "properties": {
                                "top_logprobs": {"anyOf": [{"type": "null"}, {"maximum": 0}]}
                            }
                        },
                        {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                    ]
                },
                # 'required' or a named function needs tools
                {
                    "anyOf": [
                        {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
                        {
                            "properties": {"tools": {"type": "array", "minItems": 1}},
                            "required": ["tools"],
                        },
                    ]
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: integer(-1, INT32_MAX) | None = Field(
        None,
        **json_schema(
            max_tokens_schema(limited=False),
            description="Most tokens to generate: positive (at most the server's "
            "--max-tokens-limit, if it has one), or -1 or null: until the context is full (or "
            "that limit). `max_completion_tokens`, if set, is used instead.",
        ),
    )
    max_completion_tokens: integer(-1, INT32_MAX) | None = Field(
        None,
        **json_schema(max_tokens_schema(), description="`max_tokens` under OpenAI's newer name."),
    )
    logprobs: bool = False
    top_logprobs: integer(0, 20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="A named function must be one of `tools`; 'required' needs `tools`."
    )
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Extra variables for the chat template (`enable_thinking`, …); the names the "
        "server sets itself are refused.",
        json_schema_extra=lambda schema: schema["anyOf"][0].update(
            propertyNames={"not": {"enum": sorted(RESERVED_TEMPLATE_KWARGS)}}
        ),
    )
    enable_thinking: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    reasoning_format: Literal["separate", "raw", "deepseek", "none", "auto"] | None = Field(
        None,
        description="'separate' (or 'deepseek', 'auto'): thinking in `reasoning_content`; "
        "'raw' (or 'none'): the `<think>` block stays in `content`. Default: --reasoning-format.",
    )
    thinking_budget: integer(0, INT32_MAX) | None = Field(
        None,
        description="Most tokens the model may think for before `</think>` is forced.",
    )
    mcp: bool | McpSelection | None = Field(None, description=MCP_DESCRIPTION)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, v):
        for key in v or {}:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise PydanticCustomError(
                    "reserved_key",
                    "'{key}' is set by the server itself and can't be passed here "
                    "(reserved: {reserved})",
                    {
                        "key": key,
                        "reserved": ", ".join(sorted(RESERVED_TEMPLATE_KWARGS)),
                        "param": f"chat_template_kwargs.{key}",
                    },
                )
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v):
        if v == 0:
            raise ValueError(
                "max_completion_tokens must be positive (or -1 for 'until the context ends')"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {self.tool_choice.function.name!r}, "
                    f"which is not in tools ({', '.join(names) or 'none given'})"
                )
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs a non-empty 'tools' list")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


# -- the reply ---------------------------------------------------------------------------------


class ChatLogprobTop(Schema):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChoiceLogprobs(Schema):
    content: list[ChatLogprob] | None = None


class ResponseFunctionCall(Schema):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(Schema):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunctionCall


class ResponseMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    mcp_calls: list[McpCall] | None = Field(
        None, description="With `mcp`: the tool calls the server ran, in order, and their results."
    )


class ChatChoice(Schema):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletion(Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    stats: Stats | None = None
    model_info: ModelInfo | None = None
    runtime: Runtime | None = None


# -- streamed chunks ---------------------------------------------------------------------------


class ChunkDelta(Schema):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChunkChoice(Schema):
    index: int = 0
    delta: ChunkDelta | ToolResultDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(Schema):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    stats: Stats | None = None

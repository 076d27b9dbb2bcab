"""`/v1/responses` (OpenAI's Responses API): the request and its input items, the response
object, its output items and the events of a streamed response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from .chat import FunctionDefinition
from .common import (
    INT32_MAX,
    TEXT_SCHEMA,
    CompletionTokensDetails,
    Open,
    PromptTokensDetails,
    Request,
    RequestPart,
    Schema,
    integer,
    json_schema,
    max_tokens_schema,
    model_name,
)

# -- the request and its input items -----------------------------------------------------------


class ResponsesTool(FunctionDefinition):
    """The Responses API's tool: chat's function definition with its `type` beside it."""

    type: Literal["function"]


class ResponsesInputText(Open):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class ResponsesRefusal(Open):
    type: Literal["refusal"]


class ResponsesInputOther(Open):
    type: Literal["input_image", "input_file", "input_audio"]


ResponsesPart = Annotated[
    ResponsesInputText | ResponsesRefusal | ResponsesInputOther, Field(discriminator="type")
]
# A message's image, file and audio parts are parsed (to be refused with a message naming them:
# this is a text-only model), so they are left out of the OpenAPI document. (Elsewhere, in a
# function's output or a reasoning item, such parts are accepted and read as no text.)
ResponsesMessagePart = Annotated[
    ResponsesInputText | ResponsesRefusal | SkipJsonSchema[ResponsesInputOther],
    Field(discriminator="type"),
]


class ResponsesMessageItem(Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponsesMessagePart]


class ResponsesFunctionCallItem(Open):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class ResponsesFunctionOutputItem(Open):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ResponsesPart]


class ResponsesReasoningItem(Open):
    type: Literal["reasoning"]
    summary: list[ResponsesPart] = Field(default_factory=list)
    content: list[ResponsesPart] | None = None


ResponsesInputItem = (
    ResponsesFunctionCallItem
    | ResponsesFunctionOutputItem
    | ResponsesReasoningItem
    | ResponsesMessageItem
)


class ReasoningOptions(RequestPart):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesTextFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesTextOptions(RequestPart):
    format: ResponsesTextFormat | None = None


_NAMED = {"type": "string", "minLength": 1}
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "properties": {"type": {"const": "function"}, "name": _NAMED},
            "required": ["type", "name"],
        },
        {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "name": {"anyOf": [{"const": ""}, {"type": "null"}]},
                "function": {
                    "type": "object",
                    "properties": {"name": _NAMED},
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
        {"type": "null"},
    ]
}


def tool_choice_name(choice: dict[str, Any]) -> str | None:
    """The function a dict `tool_choice` names: `{"type": "function", "name": ...}` (or chat's
    `{"type": "function", "function": {"name": ...}}`); None if it is neither."""
    if choice.get("type") != "function":
        return None
    name = choice.get("name")
    if name in (None, ""):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


class ResponsesRequest(Request):
    # The request needs a message: `instructions`, or an input item other than reasoning. A
    # named tool_choice (or 'required') needs `tools` (and to name one of them, which JSON Schema
    # can't say).
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "anyOf": [
                        {"properties": {"instructions": TEXT_SCHEMA}, "required": ["instructions"]},
                        {"properties": {"input": {"type": "string"}}},
                        {
                            "properties": {
                                "input": {
                                    "type": "array",
                                    "contains": {
                                        "anyOf": [
                                            {
                                                "properties": {"type": {"const": "message"}},
                                                "required": ["role"],
                                            },
                                            {
                                                "properties": {
                                                    "type": {
                                                        "enum": [
                                                            "function_call",
                                                            "function_call_output",
                                                        ]
                                                    }
                                                },
                                                "required": ["type"],
                                            },
                                        ]
                                    },
                                }
                            }
                        },
                    ]
                },
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

    model: str | None = Field(None, json_schema_extra=model_name("llm"))
    input: str | list[ResponsesInputItem] = Field(
        json_schema_extra=lambda schema: (
            schema["anyOf"][0].update(TEXT_SCHEMA),
            schema["anyOf"][1].update(minItems=1),
        )
    )
    instructions: str | None = None
    max_output_tokens: integer(1, INT32_MAX) | None = Field(
        None, **json_schema(max_tokens_schema(minus_one=False))
    )
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None,
        **json_schema(
            TOOL_CHOICE_SCHEMA,
            description="'auto', 'none', 'required' or a function of `tools`: "
            '{"type": "function", "name": ...}.',
        ),
    )
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningOptions | None = None
    text: ResponsesTextOptions | None = None
    previous_response_id: str | None = Field(
        None,
        description="Continue the conversation a stored response ends (its input and output "
        "come before this request's input; its instructions do not).",
    )
    store: bool | None = Field(
        None, description="Keep this response for GET and `previous_response_id` (default true)."
    )
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("input is empty")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, dict) and tool_choice_name(v) is None:
            raise ValueError(
                "expected 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}"
            )
        return v


# -- the response object -----------------------------------------------------------------------


class ResponsesUsage(Schema):
    input_tokens: int
    input_tokens_details: PromptTokensDetails
    output_tokens: int
    output_tokens_details: CompletionTokensDetails
    total_tokens: int


class ResponseObject(Schema):
    """A `/v1/responses` result; `output` holds reasoning, message and function_call items."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed", "cancelled"]
    model: str
    output: list[dict[str, Any]]
    output_text: str | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    usage: ResponsesUsage | None = None
    error: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    store: bool = True


class ResponseDeleted(Schema):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# -- responses API: output items and streaming events ---------------------------------------


class ResponseOutputText(Schema):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)


class ResponseReasoningText(Schema):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ResponseReasoningOutput(Schema):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ResponseReasoningText] = Field(default_factory=lambda: [ResponseReasoningText()])
    status: Literal["in_progress", "completed"] = "in_progress"


class ResponseMessageOutput(Schema):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed"] = "in_progress"
    content: list[ResponseOutputText] = Field(default_factory=lambda: [ResponseOutputText()])


class ResponseFunctionCallOutput(Schema):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed"] = "in_progress"


ResponseOutputItem = ResponseReasoningOutput | ResponseMessageOutput | ResponseFunctionCallOutput


class ResponsesEvent(Schema):
    """One server-sent event of a streamed `/v1/responses` (its `type` is also the SSE event)."""

    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponsesEvent):
    response: ResponseObject


class ResponseItemEvent(ResponsesEvent):
    output_index: int
    item: ResponseOutputItem


class ResponsePartEvent(ResponsesEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    part: ResponseOutputText


class ResponseReasoningDelta(ResponsesEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ResponseReasoningDone(ResponsesEvent):
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class ResponseTextDelta(ResponseReasoningDelta):
    logprobs: list[Any] = Field(default_factory=list)


class ResponseTextDone(ResponseReasoningDone):
    logprobs: list[Any] = Field(default_factory=list)


class ResponseArgumentsDelta(ResponsesEvent):
    item_id: str
    output_index: int
    delta: str


class ResponseArgumentsDone(ResponsesEvent):
    item_id: str
    output_index: int
    arguments: str

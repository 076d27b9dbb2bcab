"""Every request and response of the HTTP API as a typed schema (OpenAI's and LM Studio's shapes).

Requests are validated here, so a bad field becomes a 400 naming it before any work is queued.
Unknown request fields are ignored, as OpenAI-compatible servers (LM Studio, vLLM) do: clients
send vendor extras (`user`, `ttl`, Qwen-Agent's `extra` on messages) that must not fail a request.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator, SchemaError, validators
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Open(BaseModel):
    """Objects clients decorate with their own fields (messages, tool calls): keep them all."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# A Python str decoded from JSON may hold a lone UTF-16 surrogate ("\ud800" escaped alone): it
# is not Unicode, so the tokenizer, the template and the UTF-8 encoder all fail on it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _lone_surrogate(value: Any, loc: tuple) -> tuple[tuple, str] | None:
    """The location and the code point of the first lone surrogate anywhere in `value`."""
    stack = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return where, f"\\u{ord(found.group()):04x}"
        elif isinstance(item, dict):
            for key, v in reversed(list(item.items())):
                stack.append((v, (*where, key)))
                stack.append((key, where))  # a bad key is reported at its object
        elif isinstance(item, list | tuple):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(item))))
    return None


class Request(Schema):
    """A request body: every string in it, at any depth and in free-form objects too (tools,
    chat_template_kwargs, extra message fields), must be valid Unicode."""

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        found = _lone_surrogate(value, (info.field_name,))
        if found is not None:
            where, char = found
            raise PydanticCustomError(
                "invalid_unicode",
                "the text holds a lone UTF-16 surrogate ({char}), which is not valid Unicode: "
                "characters beyond U+FFFF must be escaped as a surrogate pair, or sent as UTF-8",
                # The handler in app.py names this deeper location instead of the field's.
                {"char": char, "param": ".".join(str(p) for p in where)},
            )
        return value


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(Schema):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(Schema):
    error: ErrorDetail


# -- shared request pieces --------------------------------------------------------------------

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

# MLX holds counts and token ids as int32 (a larger Python int fails deep in the engine with
# std::bad_cast), so every count a request carries is bounded by it.
INT32_MAX = 2**31 - 1


def _check_token_ids(ids: list, what: str) -> None:
    for i, t in enumerate(ids):
        if isinstance(t, int) and not 0 <= t <= INT32_MAX:
            raise ValueError(f"{what}[{i}]: token id {t} is outside 0..{INT32_MAX}")


def _tool_parameters(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """`parameters` must be an object schema (or `{}`: no parameters), valid JSON Schema."""
    if not v:
        return v
    if v.get("type") != "object":
        raise ValueError(
            "must be a JSON Schema of an object: "
            '{"type": "object", "properties": {...}}, '
            f"not one of type {v.get('type')!r}"
        )
    if not isinstance(v.get("$schema", ""), str):
        raise ValueError("not a valid JSON Schema: '$schema' must be a URI string")
    try:
        validators.validator_for(v, default=Draft202012Validator).check_schema(v)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.path)
        message = e.message if len(e.message) <= 200 else e.message[:200] + "…"
        where = f" (at {at})" if at else ""
        raise ValueError(f"not a valid JSON Schema: {message}{where}") from None
    except Exception as e:  # e.g. RecursionError on a pathologically deep schema
        raise ValueError(f"not a valid JSON Schema ({type(e).__name__})") from None
    return v


class StreamOptions(Schema):
    include_usage: bool = False


class FunctionDefinition(Schema):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _parameters = field_validator("parameters")(_tool_parameters)


class ChatTool(Schema):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Schema):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.type 'json_schema' needs a 'json_schema' object")
        return self


class SamplingFields(Request):
    """The generation knobs chat, completions and LM Studio share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: Probability | None = None
    max_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for key in v or {}:
            if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) > INT32_MAX:
                raise ValueError(f"logit_bias key {key!r} is not a token id")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v == 0:
            raise ValueError("max_tokens must be positive (or -1 for 'until the context ends')")
        return v


# -- chat completions ------------------------------------------------------------------------


class TextPart(Open):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ImagePart(Open):
    type: Literal["image_url", "input_image", "image", "input_audio", "file"]


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


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


# Names `render_chat` (template.py) and jinja's `Template.render` take as their own arguments:
# prepare.py passes chat_template_kwargs beside them, so one of these would be given twice.
# (`enable_thinking` is not here: prepare.py takes it out of the kwargs and honours it.)
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "chat_template", "documents", "self"}
)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_budget: int | None = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="Most tokens the model may think for before `</think>` is forced.",
    )

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


class ChatChoice(Schema):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class PromptTokensDetails(Schema):
    cached_tokens: int = 0


class CompletionTokensDetails(Schema):
    reasoning_tokens: int = 0


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails
    )


class Stats(Schema):
    """LM Studio's per-request statistics (`/api/v0` responses)."""

    tokens_per_second: float
    time_to_first_token: float
    generation_time: float
    stop_reason: str


class ModelInfo(Schema):
    arch: str
    quant: str
    format: Literal["mlx"] = "mlx"
    context_length: int


class Runtime(Schema):
    name: str = "qwen3-mlx"
    version: str
    supported_formats: list[str] = Field(default_factory=lambda: ["mlx", "safetensors"])


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


class ChunkDelta(Schema):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChunkChoice(Schema):
    index: int = 0
    delta: ChunkDelta
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


# -- text completions -------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(
        description="One prompt: a string, a one-string list, or a list of token ids."
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is empty")
            if isinstance(v[0], str) and len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        elif not v:
            raise ValueError("prompt is empty")
        if isinstance(v, list):
            _check_token_ids(v, "prompt")
        return v


class CompletionLogprobs(Schema):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Schema):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    stats: Stats | None = None
    model_info: ModelInfo | None = None
    runtime: Runtime | None = None


# -- embeddings -------------------------------------------------------------------------------


class EmbeddingRequest(Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and any(isinstance(x, list | str) and not x for x in v)):
            raise ValueError("input must be a non-empty string, list of strings or token ids")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if isinstance(v, list) and v and isinstance(v[0], int):
            _check_token_ids(v, "input")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, list):
                    _check_token_ids(item, f"input[{i}]")
        return v


class Embedding(Schema):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Schema):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- models -----------------------------------------------------------------------------------


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "organization_owner"


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LMStudioModel(Schema):
    id: str
    object: Literal["model"] = "model"
    type: Literal["llm", "embeddings"]
    publisher: str
    arch: str
    compatibility_type: Literal["mlx"] = "mlx"
    quantization: str
    state: Literal["loaded", "not-loaded"] = "loaded"
    max_context_length: int
    capabilities: list[str] = Field(default_factory=list)


class LMStudioModelList(Schema):
    object: Literal["list"] = "list"
    data: list[LMStudioModel]


# -- responses API ----------------------------------------------------------------------------


class ResponsesTool(Schema):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _parameters = field_validator("parameters")(_tool_parameters)


class ResponsesInputText(Open):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class ResponsesInputOther(Open):
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


ResponsesPart = Annotated[ResponsesInputText | ResponsesInputOther, Field(discriminator="type")]


class ResponsesMessageItem(Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponsesPart]


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


class ReasoningOptions(Schema):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesTextFormat(Schema):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesTextOptions(Schema):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(Request):
    model: str | None = None
    input: str | list[ResponsesInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningOptions | None = None
    text: ResponsesTextOptions | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("input is empty")
        return v


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

"""`/v1/completions` (text completions): the request, its logprobs and the reply."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .common import (
    MAX_CHOICES,
    SERVER_LIMIT,
    TEXT_SCHEMA,
    Integer,
    Schema,
    Usage,
    check_token_ids,
    integer,
    json_schema,
    token_ids_schema,
)
from .lmstudio import ModelInfo, Runtime, Stats
from .sampling import ResponseFormat, SamplingFields


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Integer] | list[list[Integer]] = Field(
        **json_schema(
            {
                "anyOf": [
                    TEXT_SCHEMA,
                    token_ids_schema(),
                    *(
                        {
                            "type": "array",
                            "items": item,
                            "minItems": 1,
                            "maxItems": MAX_CHOICES,
                            SERVER_LIMIT: "choices",
                        }
                        for item in (TEXT_SCHEMA, token_ids_schema())
                    ),
                ]
            },
            description="A prompt (a string or a list of token ids), or several (a list of "
            "strings or of token-id lists): one choice each, decoded in one batch.",
        )
    )
    echo: bool = False
    logprobs: integer(0, 20) | None = None
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if not v:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and isinstance(v[0], str | list):
            if len(v) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} prompts per request")
            for i, item in enumerate(v):
                if not item:
                    raise ValueError(f"prompt[{i}] is empty")
                if isinstance(item, list):
                    check_token_ids(item, f"prompt[{i}]")
        elif isinstance(v, list):
            check_token_ids(v, "prompt")
        return v


class CompletionLogprobs(Schema):
    """`token_logprobs` and `top_logprobs` are null for an echoed prompt's first token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
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

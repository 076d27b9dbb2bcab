"""The generation knobs chat, text completions and LM Studio's routes share (`SamplingFields`),
and the structured-output request (`response_format`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .common import INT32_MAX, MAX_CHOICES, Penalty, Probability, Request, Schema


class StreamOptions(Schema):
    include_usage: bool = False


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
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices to generate: each is a row of the running batch (prompt counted once).",
    )
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

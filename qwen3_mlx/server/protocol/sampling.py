"""The generation knobs chat, text completions and LM Studio's routes share (`SamplingFields`),
and the structured-output request (`response_format`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .common import (
    INT32_MAX,
    MAX_CHOICES,
    SERVER_LIMIT,
    TEXT_SCHEMA,
    Integer,
    Penalty,
    Probability,
    Request,
    RequestPart,
    integer,
    json_schema,
    max_tokens_schema,
    model_name,
    nullable,
    token_id_key_schema,
)

MAX_STOP = 16
TTL_DESCRIPTION = (
    "LM Studio's idle TTL, if this request loads the model: seconds it stays loaded after its "
    "last request (default: the server's --ttl; a model already loaded keeps its own)."
)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # an int64 or a uint64 (taken modulo 2**64)
# A repetition penalty divides logits: one below float32's normal range (~1.2e-38) makes them
# infinite (and the logprobs not JSON). Any penalty a client means is far above this.
MIN_REPETITION_PENALTY = 1e-6


class StreamOptions(RequestPart):
    include_usage: bool = False


class JsonSchemaFormat(RequestPart):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestPart):
    # The validator below, as JSON Schema: type "json_schema" needs its `json_schema` object.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"type": {"enum": ["text", "json_object"]}}},
                {"properties": {"json_schema": {"type": "object"}}, "required": ["json_schema"]},
            ]
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.type 'json_schema' needs a 'json_schema' object")
        return self


class SamplingFields(Request):
    """The generation knobs chat, completions and LM Studio share."""

    model: str | None = Field(None, json_schema_extra=model_name("llm"))
    draft_model: str | None = Field(
        None,
        description="LM Studio's speculative decoding: the draft the server was started with "
        "(--draft-model); any other name is a 400. Without it, a server with a draft uses it.",
        json_schema_extra=lambda schema: schema["anyOf"][0].update({SERVER_LIMIT: "draft-model"}),
    )
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: integer(-1, INT32_MAX) | None = None
    min_p: Probability | None = None
    max_tokens: integer(-1, INT32_MAX) | None = Field(
        None,
        **json_schema(
            max_tokens_schema(),
            description="Most tokens to generate: positive (at most the server's "
            "--max-tokens-limit, if it has one), or -1 or null: until the context is full "
            "(or that limit).",
        ),
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None,
        **json_schema(
            nullable(
                {
                    "anyOf": [
                        TEXT_SCHEMA,
                        {"type": "array", "items": TEXT_SCHEMA, "maxItems": MAX_STOP},
                    ]
                }
            ),
            description=f"Up to {MAX_STOP} non-empty strings that end generation.",
        ),
    )
    seed: integer(SEED_MIN, SEED_MAX) | None = Field(
        None,
        json_schema_extra=lambda schema: schema["anyOf"][0].update({SERVER_LIMIT: "seed"}),
    )
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10.0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None,
        description="{token id: bias in [-100, 100]}; token ids of the model's vocabulary.",
        json_schema_extra=lambda schema: schema["anyOf"][0].update(
            propertyNames=token_id_key_schema()
        ),
    )
    n: Integer = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices to generate: each is a row of the running batch (prompt counted "
        "once). A request's rows (n times its prompts) are at most the server's --max-queue.",
        json_schema_extra={SERVER_LIMIT: "choices"},
    )
    user: str | None = None
    ttl: integer(0, INT32_MAX) | None = Field(None, description=TTL_DESCRIPTION)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
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

"""`/v1/embeddings`: the request and the list of vectors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .common import (
    INT32_MAX,
    TEXT_SCHEMA,
    Integer,
    Request,
    Schema,
    check_token_ids,
    integer,
    json_schema,
    model_name,
    token_ids_schema,
)
from .sampling import TTL_DESCRIPTION

MAX_INPUTS = 2048


class EmbeddingRequest(Request):
    model: str | None = Field(None, json_schema_extra=model_name("embeddings"))
    input: str | list[str] | list[Integer] | list[list[Integer]] = Field(
        **json_schema(
            {
                "anyOf": [
                    TEXT_SCHEMA,
                    token_ids_schema(),
                    *(
                        {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_INPUTS}
                        for item in (TEXT_SCHEMA, token_ids_schema())
                    ),
                ]
            },
            description=f"A text or a list of token ids, or up to {MAX_INPUTS} of either: one "
            "vector each.",
        )
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: integer(1, INT32_MAX) | None = None
    user: str | None = None
    ttl: integer(0, INT32_MAX) | None = Field(None, description=TTL_DESCRIPTION)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if not v or (isinstance(v, list) and any(isinstance(x, list | str) and not x for x in v)):
            raise ValueError("input must be a non-empty string, list of strings or token ids")
        if isinstance(v, list) and len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        if isinstance(v, list) and v and isinstance(v[0], int):
            check_token_ids(v, "input")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, list):
                    check_token_ids(item, f"input[{i}]")
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

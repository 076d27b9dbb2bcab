"""What every schema of the API shares: the base classes, request-wide Unicode checking, the
error object, bounded number types, validators of token ids and tool parameter schemas, usage."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any

from jsonschema import Draft202012Validator, SchemaError, validators
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
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

# `n` (and a completion's list of prompts): choices per request, as OpenAI bounds them.
MAX_CHOICES = 128


def check_token_ids(ids: list, what: str) -> None:
    for i, t in enumerate(ids):
        if isinstance(t, int) and not 0 <= t <= INT32_MAX:
            raise ValueError(f"{what}[{i}]: token id {t} is outside 0..{INT32_MAX}")


def tool_parameters(v: dict[str, Any] | None) -> dict[str, Any] | None:
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


# -- usage -------------------------------------------------------------------------------------


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

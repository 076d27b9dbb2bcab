"""What every schema of the API shares: the base classes, request-wide Unicode checking, the
error object, bounded number types, validators of token ids and tool parameter schemas, usage."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any

from jsonschema import Draft202012Validator, SchemaError, validators
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class RequestPart(Schema):
    """A piece of a request. Strict, as OpenAI is: the JSON types are the schema's (`"n": "2"`,
    `"stream": 1` or `"max_tokens": 8.5` are refused, not coerced; see `Integer` for 8.0)."""

    model_config = ConfigDict(strict=True)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A request's integer: JSON Schema's (a number without a fractional part, `8.0` too), never a
# bool or a string. (Strict pydantic alone would refuse 8.0; lax would take `true` and "8".)
Integer = Annotated[int, BeforeValidator(_integral)]


def integer(ge: int, le: int) -> Any:
    """`Integer` within [ge, le]. (The bounds go inside: given to the field of an `Integer |
    None`, pydantic would check them but write `ge`/`le`, not JSON Schema's words.)"""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


class Open(BaseModel):
    """Request objects clients decorate with their own fields (messages, tool calls): keep them
    all. Strict as `RequestPart`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)


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


class Request(RequestPart):
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


# -- what the OpenAPI document states ---------------------------------------------------------
#
# /openapi.json must state what the server accepts. Checks made by field validators (whose error
# messages name the field as clients expect) are stated here as the field's JSON Schema, written
# out with `json_schema=` (it replaces the generated one; validation is unchanged). A bound that
# depends on how the server runs carries `x-server-limit`, which `openapi.document_server` fills
# in: "max-tokens" (--max-tokens-limit), "choices" (--max-queue), "token-id" and "token-id-key"
# (the served models' vocabulary), "llm-model", "embeddings-model" and "ollama-llm-model" (the
# served models' names); and "seed", whose bounds FastAPI would round (its OpenAPI models hold
# bounds as floats).

SERVER_LIMIT = "x-server-limit"


def json_schema(schema: dict[str, Any], **field: Any) -> dict[str, Any]:
    """`Field(**json_schema(...))`: the field's JSON Schema is `schema` (the generated `anyOf`,
    `type` and bounds are dropped; title, description and default are kept)."""

    def replace(generated: dict[str, Any]) -> None:
        kept = {k: generated[k] for k in ("title", "description", "default") if k in generated}
        generated.clear()
        generated.update(kept, **schema)

    return {**field, "json_schema_extra": replace}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [*schema.get("anyOf", [schema]), {"type": "null"}]}


def digits_up_to(n: int) -> str:
    """A regex for the decimal numbers 0..n (no leading zeros)."""
    top = str(n)

    def same_length(digits: str, first: bool) -> str:
        # numbers of len(digits) digits (a non-zero first one when `first`), up to `digits`
        low, high, rest = (1 if first else 0), int(digits[0]), len(digits) - 1
        options = []
        if high - 1 >= low:
            span = str(low) if high - 1 == low else f"[{low}-{high - 1}]"
            options.append(span + ("[0-9]" * rest if rest < 2 else f"[0-9]{{{rest}}}"))
        options.append(digits[0] + (same_length(digits[1:], False) if rest else ""))
        return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"

    if len(top) == 1:
        return f"[0-{top}]"
    shorter = ["0", "[1-9]" if len(top) == 2 else f"[1-9][0-9]{{0,{len(top) - 2}}}"]
    return "(?:" + "|".join([*shorter, same_length(top, True)]) + ")"


def model_name(kind: str) -> dict[str, Any]:
    """A request's `model`: with several models served, a name of one of `kind` ("llm" or
    "embeddings") or unknown (404); another kind's model is a 400."""
    return {SERVER_LIMIT: f"{kind}-model"}


def token_id_schema() -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": INT32_MAX, SERVER_LIMIT: "token-id"}


def token_id_key_schema() -> dict[str, Any]:
    """A token id as a JSON object key (`logit_bias`): up to 10 digits, leading zeros allowed."""
    return {
        "type": "string",
        "pattern": f"^0*{digits_up_to(INT32_MAX)}$",
        "maxLength": 10,
        SERVER_LIMIT: "token-id-key",
    }


def token_ids_schema() -> dict[str, Any]:
    return {"type": "array", "items": token_id_schema(), "minItems": 1}


TEXT_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1}


def max_tokens_schema(*, minus_one: bool = True, limited: bool = True) -> dict[str, Any]:
    """Output tokens: positive (up to --max-tokens-limit if `limited`), -1 ("until the context
    ends"), null."""
    positive = {"type": "integer", "minimum": 1, "maximum": INT32_MAX}
    if limited:
        positive[SERVER_LIMIT] = "max-tokens"
    options = [positive, {"type": "integer", "const": -1}] if minus_one else [positive]
    return nullable({"anyOf": options})


# `tool_parameters` below: `{}`, or a JSON Schema of an object, in a dialect jsonschema and
# llguidance know (2020-12 if `$schema` is left out). Stated here: its top-level `type` and
# `$schema`, and the types the dialect gives the keywords a tool's schema mostly uses. (JSON
# Schema's meta-schema, what the validator checks the rest against, is recursive and large:
# spelled out in full, it tripled a schemathesis run's time and tripped its generator.)
def _dialect(*drafts: str) -> list[str]:
    return [
        uri + end
        for draft in drafts
        for uri in (
            f"http://json-schema.org/{draft}/schema"
            if draft.startswith("draft-")
            else f"https://json-schema.org/draft/{draft}/schema",
        )
        for end in ("", "#")
    ]


# Not draft-03, whose `required` (a boolean) llguidance can't enforce.
_DRAFT_04 = _dialect("draft-04")  # no boolean schemas; `required` has an item or more
_NEW_DIALECTS = _dialect("draft-06", "draft-07", "2019-09", "2020-12")
JSON_SCHEMA_DIALECTS = (*_DRAFT_04, *_NEW_DIALECTS)


def _tool_schema(dialects: list[str], subschema: Any, required: Any, *, default: bool) -> dict:
    """An object schema in `dialects` (also with no `$schema` if `default`): its keywords."""
    return {
        "type": "object",
        "properties": {
            "type": {"const": "object"},
            "$schema": {"enum": dialects},
            "properties": {"type": "object", "additionalProperties": subschema},
            "required": required,
            "additionalProperties": {"type": ["object", "boolean"]},
            "description": {"type": "string"},
        },
        "required": ["type"] if default else ["type", "$schema"],
    }


_STRINGS = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
TOOL_PARAMETERS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "object", "maxProperties": 0},
        _tool_schema(_NEW_DIALECTS, {"type": ["object", "boolean"]}, _STRINGS, default=True),
        _tool_schema(_DRAFT_04, {"type": "object"}, {**_STRINGS, "minItems": 1}, default=False),
    ]
}


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
    dialect = v.get("$schema")
    if dialect is not None and (
        not isinstance(dialect, str) or dialect not in JSON_SCHEMA_DIALECTS
    ):
        # jsonschema would check it as 2020-12 (and warn that this will become an error), and
        # llguidance, enforcing a required tool call, refuses a dialect it doesn't know.
        raise ValueError(
            "not a valid JSON Schema: '$schema' must name a JSON Schema dialect "
            "(draft-04 to 2020-12, e.g. 'https://json-schema.org/draft/2020-12/schema') "
            "or be left out"
        )
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
    # OpenAI's names for drafted tokens the model confirmed or replaced (its Predicted Outputs);
    # here: speculative decoding's drafts.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(
        default_factory=CompletionTokensDetails
    )

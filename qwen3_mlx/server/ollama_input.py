"""An Ollama `/api/chat` or `/api/generate` request as the chat (or text completion) request it
amounts to, which then runs the OpenAI route's own path (`prepare_chat` / `prepare_completion`).

Messages map one to one: an assistant's `thinking` is its `reasoning_content`, its `tool_calls`
(arguments as an object) chat's, a `tool` message's `tool_name` its `name`. `options` are chat's
sampling fields (`num_predict` is `max_tokens`; -1 and -2 mean "until the context ends"),
`format` is `response_format` ("json": any object; an object: a JSON Schema), `think` is Qwen3's
switch (`enable_thinking`) or, as a level, chat's `reasoning_effort` (the same thinking
budgets). `/api/generate` is a one-turn chat (its `system` and `prompt`), or with `raw` or a
`template` a text completion of the prompt as given (rendered, for a template).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .prepare import ApiError
from .protocol import ChatCompletionRequest, CompletionRequest
from .protocol.ollama import (
    GenerateFields,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaMessage,
)
from .responses_input import first_error

# Seconds per unit of a Go duration (Ollama's `keep_alive` strings).
DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "m": 60,
    "h": 3600,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def keep_alive_seconds(value: float | str | None) -> Any:
    """`keep_alive` as the model's idle TTL in seconds: a number of seconds or a Go duration
    ("5m", "1h30m"); negative: stay loaded (None); left out: UNSET (the model's own)."""
    from .loader import UNSET

    if value is None:
        return UNSET
    if isinstance(value, str):
        sign = -1 if value.startswith("-") else 1
        parts = _DURATION_PART.findall(value.lstrip("+-"))
        value = sign * sum(float(n or 0) * DURATION_UNITS[unit] for n, unit in parts)
    if math.isnan(value):
        return UNSET
    return None if value < 0 or math.isinf(value) else float(value)


# Chat's names for what Ollama calls otherwise: an error about one names Ollama's field.
OLLAMA_NAMES = {"max_tokens": "options.num_predict", "response_format": "format"}


def ollama_error(e: ApiError) -> ApiError:
    """`e` with its field (and message) in Ollama's words."""
    name = OLLAMA_NAMES.get(e.param or "")
    if name is not None:
        e.message = e.message.replace(e.param, name, 1)
        e.param = name
    return e


def _sampling(body: GenerateFields) -> dict[str, Any]:
    """The chat / completion fields `options` and `format` amount to."""
    fields: dict[str, Any] = {"model": body.model, "stream": body.stream}
    o = body.options
    if o is not None:
        fields.update(
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            min_p=o.min_p,
            seed=o.seed,
            stop=o.stop or None,
            repeat_penalty=o.repeat_penalty,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            # Ollama's -2 ("until the context is full") is -1 here.
            max_tokens=None if o.num_predict is None else max(o.num_predict, -1),
        )
    fmt = body.format
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "format", "schema": fmt},
        }
    return fields


def _thinking(body: GenerateFields) -> dict[str, Any]:
    """`think`: left out, the chat default (Qwen3 thinks), as Ollama enables a thinking model's
    thinking when a request doesn't say."""
    if body.think is None:
        return {}
    if isinstance(body.think, bool):
        return {"enable_thinking": body.think}
    return {"enable_thinking": True, "reasoning_effort": body.think}


def _refuse_images(images, where: str) -> None:
    if images:
        raise ApiError(
            400,
            f"{where}: images are not supported (this is a text-only model)",
            param=where,
        )


def _message(message: OllamaMessage, index: int) -> dict[str, Any]:
    _refuse_images(message.images, f"messages.{index}.images")
    out: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.role == "assistant":
        if message.thinking:
            out["reasoning_content"] = message.thinking
        if message.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id or f"call_{index}_{i}",
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                }
                for i, call in enumerate(message.tool_calls)
            ]
    if message.role == "tool":
        if message.tool_name:
            out["name"] = message.tool_name
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
    return out


# JSON Schema's usual order, in which the OpenAI SDK and transformers write a tool's parameters.
SCHEMA_ORDER = ("type", "properties", "required")


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    """`tool` with its parameters' keys in JSON Schema's usual order: Ollama's Python client
    writes `required` before `properties`, and Qwen3's template prints a schema as it comes, so
    the prompt would differ from the one the same tools make through the OpenAI route."""
    parameters = tool["function"].get("parameters")
    if parameters:
        first = {k: parameters[k] for k in SCHEMA_ORDER if k in parameters}
        tool["function"]["parameters"] = {**first, **parameters}
    return tool


def _validated(cls, fields: dict[str, Any], param: str):
    try:
        return cls.model_validate(fields)
    except ValueError as e:
        raise ApiError(400, first_error(e), param=param) from None


def chat_of(body: OllamaChatRequest) -> ChatCompletionRequest:
    """An `/api/chat` request (with messages) as the equivalent chat completion request."""
    fields = _sampling(body)
    fields["messages"] = [_message(m, i) for i, m in enumerate(body.messages)]
    if body.tools:
        fields["tools"] = [_tool(t.model_dump(exclude_none=True)) for t in body.tools]
    fields.update(_thinking(body))
    return _validated(ChatCompletionRequest, fields, "messages")


def generate_of(body: OllamaGenerateRequest) -> ChatCompletionRequest | CompletionRequest:
    """An `/api/generate` request (with a prompt): a one-turn chat, or with `raw` or a
    `template` a completion of the prompt as given."""
    _refuse_images(body.images, "images")
    if body.suffix:
        raise ApiError(
            400,
            "suffix: this model does not support insert (fill-in-the-middle)",
            param="suffix",
        )
    if body.context:
        raise ApiError(
            400,
            "context: not supported (Ollama deprecated it); send the conversation to /api/chat",
            param="context",
        )
    fields = _sampling(body)
    if body.raw or body.template:
        prompt = body.prompt or ""
        if not body.raw:
            prompt = render_template(body.template, system=body.system or "", prompt=prompt)
        fields["prompt"] = prompt
        return _validated(CompletionRequest, fields, "prompt")
    messages = [{"role": "system", "content": body.system}] if body.system else []
    fields["messages"] = [*messages, {"role": "user", "content": body.prompt or ""}]
    fields.update(_thinking(body))
    return _validated(ChatCompletionRequest, fields, "prompt")


# -- Ollama's Go templates, the part a one-turn prompt needs -----------------------------------

# `{{ action }}`; `{{- ` and ` -}}` trim the whitespace before and after (Go: the dash must be
# followed, or preceded, by a space).
_ACTION = re.compile(r"\{\{(-(?=\s))?(.*?)((?<=\s)-)?\}\}", re.S)
_VALUES = (".System", ".Prompt", ".Response")
SERVED = "{{ .System }}, {{ .Prompt }}, {{ .Response }}, {{ if … }} / {{ else }} / {{ end }}"


def render_template(template: str, *, system: str, prompt: str) -> str:
    """The prompt `template` makes of `system` and `prompt`: rendered up to `{{ .Response }}`
    (where the reply goes, as Ollama cuts it), with `if` on the three values. Any other action
    (ranges over messages, functions…) is a 400 naming it."""
    values = {".System": system, ".Prompt": prompt, ".Response": ""}
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []  # per open `if`: (was active, its condition)
    active, trim_next, pos = True, False, 0

    def text(piece: str, trim_before: bool) -> None:
        if trim_next:
            piece = piece.lstrip()
        if trim_before:
            piece = piece.rstrip()
        if active:
            out.append(piece)

    for match in _ACTION.finditer(template):
        text(template[pos : match.start()], bool(match.group(1)))
        pos, trim_next = match.end(), bool(match.group(3))
        action = match.group(2).strip()
        if action.startswith("/*") and action.endswith("*/"):
            continue
        if action in _VALUES:
            if active and action == ".Response":
                return "".join(out)
            if active:
                out.append(values[action])
        elif action.startswith("if ") and action[3:].strip() in _VALUES:
            condition = bool(values[action[3:].strip()])
            stack.append((active, condition))
            active = active and condition
        elif action == "else" and stack:
            was, condition = stack[-1]
            active = was and not condition
        elif action == "end" and stack:
            active = stack.pop()[0]
        else:
            raise ApiError(
                400,
                f"template: '{{{{ {action} }}}}' is not supported (served: {SERVED})",
                param="template",
            )
    if stack:
        raise ApiError(400, "template: an 'if' has no '{{ end }}'", param="template")
    text(template[pos:], False)
    return "".join(out)

"""An LM Studio `/api/v1/chat` request as the equivalent chat completion request (then
`prepare_chat`, as every route).

`system_prompt` is a system message and `input` one user message (a string, or text items as
its content parts). `reasoning` is Qwen3's switch and budget: "off" turns thinking off, "on"
turns it on without a budget, "low" / "medium" / "high" turn it on with chat's
`reasoning_effort` budgets; left out, Qwen3 thinks (LM Studio's default for it: "on").
`max_output_tokens` is `max_tokens`; the sampling fields are chat's.
"""

from __future__ import annotations

from typing import Any

from .prepare import ApiError
from .protocol import ChatCompletionRequest
from .protocol.lmstudio_v1 import V1ChatRequest, V1ImageInput
from .responses_input import first_error


def chat_of(body: V1ChatRequest) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    if body.system_prompt:
        messages.append({"role": "system", "content": body.system_prompt})
    content: Any = body.input
    if isinstance(content, list):
        for i, item in enumerate(content):
            if isinstance(item, V1ImageInput):
                raise ApiError(
                    400,
                    f"input.{i}: images are not supported (this is a text-only model)",
                    param=f"input.{i}",
                )
        content = [{"type": "text", "text": item.content} for item in content]
    messages.append({"role": "user", "content": content})
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "stream": body.stream,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty,
        "max_tokens": body.max_output_tokens,
    }
    if body.reasoning is not None:
        chat["enable_thinking"] = body.reasoning != "off"
        if body.reasoning in ("low", "medium", "high"):
            chat["reasoning_effort"] = body.reasoning
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValueError as e:
        raise ApiError(400, first_error(e), param="input") from None

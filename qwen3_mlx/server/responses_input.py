"""A `/v1/responses` request as the equivalent chat completion request (then `prepare_chat`).

Input items map to chat messages: a `reasoning` item becomes the next assistant message's
`reasoning_content`, consecutive `function_call` items one assistant message's `tool_calls`, a
`function_call_output` a `tool` message. `reasoning.effort` is chat's `reasoning_effort` (the same
thinking budgets), `text.format` its `response_format`.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from .prepare import ApiError
from .protocol import ChatCompletionRequest, ResponsesRequest
from .protocol.responses import ResponsesInputItem


def responses_to_chat(
    body: ResponsesRequest, history: list[dict[str, Any]] = ()
) -> ChatCompletionRequest:
    """A `/v1/responses` request as the equivalent chat completion request; `history`: the
    conversation a `previous_response_id` ends (chat messages, without its instructions)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    messages += [dict(m) for m in history]
    messages += input_messages(body.input)
    if not messages:
        raise ApiError(400, "input has no messages", param="input")
    return _chat_request(body, messages)


def input_messages(items) -> list[dict[str, Any]]:
    """Responses input (a string, or input items; a response's output items read the same) as
    chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        pending_reasoning = None
        for item in items:
            if item.type == "message":
                content = item.content
                if not isinstance(content, str):
                    for part in content:
                        if part.type in ("input_image", "input_file", "input_audio"):
                            raise ApiError(
                                400,
                                f"input: '{part.type}' parts are not supported "
                                "(this is a text-only model)",
                                param="input",
                            )
                    content = "".join(getattr(p, "text", "") for p in content)
                message = {"role": item.role, "content": content}
                if item.role == "assistant" and pending_reasoning:
                    message["reasoning_content"], pending_reasoning = pending_reasoning, None
                messages.append(message)
            elif item.type == "reasoning":
                parts = (item.content or []) or item.summary
                pending_reasoning = "".join(getattr(p, "text", "") for p in parts)
            elif item.type == "function_call":
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                    last["tool_calls"].append(call)
                else:
                    message = {"role": "assistant", "content": "", "tool_calls": [call]}
                    if pending_reasoning:
                        message["reasoning_content"], pending_reasoning = pending_reasoning, None
                    messages.append(message)
            elif item.type == "function_call_output":
                output = item.output
                if not isinstance(output, str):
                    output = "".join(getattr(p, "text", "") for p in output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored response's output items (JSON) as the chat messages of its turn."""
    return input_messages(TypeAdapter(list[ResponsesInputItem]).validate_python(output))


def _chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
            for t in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, dict):
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not name:
            raise ApiError(
                400,
                "tool_choice: expected 'auto', 'none', 'required' or "
                '{"type": "function", "name": ...}',
                param="tool_choice",
            )
        choice = {"type": "function", "function": {"name": name}}
    if choice is not None:
        chat["tool_choice"] = choice
    if body.reasoning and body.reasoning.effort:
        chat["reasoning_effort"] = body.reasoning.effort
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        chat["response_format"] = (
            {"type": "json_object"}
            if fmt.type == "json_object"
            else {
                "type": "json_schema",
                "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_ or {}},
            }
        )
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValueError as e:
        raise ApiError(400, first_error(e), param="input") from None


def first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"
    return str(e)

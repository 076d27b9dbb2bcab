"""An Anthropic `/v1/messages` request as the equivalent chat completion request (then
`prepare_chat`, as every route).

`system` is a system message; a user message's text blocks stay one user message (as chat's
content parts), its `tool_result` blocks become `tool` messages, in block order; an assistant's
text blocks are its content, its thinking blocks its `reasoning_content` (redacted ones, which
hold no text we could read, are dropped) and its `tool_use` blocks its `tool_calls`. Tools are
chat's functions (`input_schema` is `parameters`); `tool_choice` any/tool/none are chat's
required/named/none. `thinking` is Qwen3's switch (`enable_thinking`) and budget
(`thinking_budget`): left out, the model answers without thinking, as Anthropic's models do.
"""

from __future__ import annotations

from typing import Any

from .prepare import ApiError
from .protocol import ChatCompletionRequest
from .protocol.anthropic import (
    AnthropicAssistantMessage,
    AnthropicMedia,
    AnthropicText,
    AnthropicThinking,
    AnthropicToolResult,
    AnthropicToolUse,
    CountTokensRequest,
    MessagesRequest,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
)
from .responses_input import first_error


def _parts(blocks, where: str) -> list[dict[str, str]]:
    """Text blocks as chat content parts; a block a text-only model can't read is a 400."""
    parts = []
    for i, block in enumerate(blocks):
        if isinstance(block, AnthropicMedia):
            raise ApiError(
                400,
                f"{where}.{i}: '{block.type}' blocks are not supported (this is a text-only model)",
                param=f"{where}.{i}",
            )
        parts.append({"type": "text", "text": block.text})
    return parts


def _user(content, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or not content:
        return [{"role": "user", "content": content or ""}]
    messages: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        if isinstance(block, AnthropicToolResult):
            result = block.content
            if not isinstance(result, str):
                result = _parts(result, f"{where}.{i}.content")
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
            continue
        text = _parts([block], where)[0]  # refuses media blocks, naming their index
        if messages and messages[-1]["role"] == "user":
            messages[-1]["content"].append(text)
        else:
            messages.append({"role": "user", "content": [text]})
    return messages


def _assistant(content) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, reasoning, calls = [], [], []
    for block in content:
        if isinstance(block, AnthropicText):
            texts.append({"type": "text", "text": block.text})
        elif isinstance(block, AnthropicThinking):
            reasoning.append(block.thinking)
        elif isinstance(block, AnthropicToolUse):
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": block.input},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": texts}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def anthropic_to_chat(body: CountTokensRequest) -> ChatCompletionRequest:
    """A `/v1/messages` (or count_tokens) request as the equivalent chat completion request."""
    messages: list[dict[str, Any]] = []
    if body.system:
        system = body.system
        messages.append(
            {
                "role": "system",
                "content": system if isinstance(system, str) else _parts(system, "system"),
            }
        )
    for i, message in enumerate(body.messages):
        if isinstance(message, AnthropicAssistantMessage):
            messages.append(_assistant(message.content))
        else:
            messages += _user(message.content, f"messages.{i}.content")
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceNone):
        chat["tool_choice"] = "none"
    elif isinstance(choice, ToolChoiceAny):
        chat["tool_choice"] = "required"
    elif isinstance(choice, ToolChoiceTool):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    if getattr(choice, "disable_parallel_tool_use", None):
        chat["parallel_tool_calls"] = False
    thinking = body.thinking
    chat["enable_thinking"] = thinking is not None and not isinstance(thinking, ThinkingDisabled)
    if isinstance(thinking, ThinkingEnabled):
        chat["thinking_budget"] = thinking.budget_tokens
    if isinstance(body, MessagesRequest):
        chat.update(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_sequences or None,
            stream=body.stream,
        )
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValueError as e:
        raise ApiError(400, first_error(e), param="messages") from None

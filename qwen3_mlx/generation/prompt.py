"""Prompts: chat messages or raw text → tokens, and where the reply starts (thinking or not).

`generation_config.json` is read by `config.generation_config`, once per file version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..config import generation_config  # noqa: F401 (read in one place, used from here)
from ..errors import GenerationError
from ..template import generation_prompt_state, render_chat, thinking_enabled

PromptState = Literal["thinking", "answer", "open"]


@dataclass
class Prompt:
    """A prompt ready for generation.

    state: where the output starts — "thinking" (the prompt opened a think block),
    "answer" (it pre-filled a closed one, enable_thinking=False) or "open" (the model
    decides: Qwen3 writes <think> itself). thinking: whether this reply is meant to think
    (False under enable_thinking=False or /no_think): picks the sampling defaults and
    whether a thinking budget applies.
    """

    tokens: list[int]
    text: str
    state: PromptState = "open"
    thinking: bool = True


def prepare_prompt(
    tokenizer: Any,
    prompt: str | list[int] | None = None,
    messages: list[Any] | None = None,
    *,
    tools: list[Any] | None = None,
    enable_thinking: bool = True,
) -> Prompt:
    """Render `messages` with the chat template (or take `prompt` as is) and tokenize."""
    if (prompt is None) == (messages is None):
        raise GenerationError("give either prompt or messages, not both/neither")
    if messages is not None:
        text = render_chat(
            messages,
            tools,
            enable_thinking=enable_thinking,
            chat_template=tokenizer.chat_template,
            **tokenizer.special_tokens_map,
        )
        tokens = tokenizer.encode(text)
        thinking = thinking_enabled(messages, default=enable_thinking)
    elif isinstance(prompt, str):
        if tools:
            raise GenerationError("tools: only with messages (a raw prompt is not templated)")
        text, tokens = prompt, tokenizer.encode(prompt)
        thinking = True
    else:
        tokens = [int(t) for t in prompt]
        text = tokenizer.decode(tokens)
        thinking = True
    if not tokens:
        raise GenerationError("prompt: empty (nothing to generate from)")
    state = generation_prompt_state(text)
    return Prompt(tokens, text, state, thinking and state != "answer")

"""Chat messages -> prompt text, exactly as Qwen3's chat template renders them.

Two paths, one output:

- The checkpoint ships a `chat_template` (jinja2): it is rendered the way
  transformers' `apply_chat_template` does (sandboxed environment, trim_blocks,
  lstrip_blocks, a non-escaping `tojson`, `raise_exception`, `strftime_now`).
- It ships none: a built-in Python renderer produces the same bytes as Qwen3's
  official template (the revision with `reasoning_content`, April-May 2025).

What the official template does, and so what the built-in renderer does:

    [system]   <|im_start|>system\\n{system}<|im_end|>\\n     (only if messages[0] is system)
    with tools, the system block becomes
               <|im_start|>system\\n{system}\\n\\n# Tools\\n\\n...<tools>\\n{tool json per line}\\n</tools>...<|im_end|>\\n
    user       <|im_start|>user\\n{content}<|im_end|>\\n
    assistant  <|im_start|>assistant\\n{content}[\\n<tool_call>...</tool_call>]*<|im_end|>\\n
               Reasoning (`reasoning_content`, or a <think>...</think> prefix of the
               content) is kept only for assistant turns after the last real user
               query, i.e. the tool-calling steps of the current turn, as
               <think>\\n{reasoning}\\n</think>\\n\\n{content}. Earlier turns lose it.
    tool       consecutive tool messages become ONE user turn:
               <|im_start|>user\\n<tool_response>\\n{r1}\\n</tool_response>\\n<tool_response>\\n{r2}\\n</tool_response><|im_end|>\\n
    prompt     <|im_start|>assistant\\n, plus <think>\\n\\n</think>\\n\\n when enable_thinking=False

Thinking control, the two switches Qwen3 documents:

- Hard switch, `enable_thinking=False`: the prompt pre-fills an empty think block,
  so the model answers at once; `generation_prompt_state(prompt)` is "answer".
- Soft switch, `/think` or `/no_think` in a user or system message (the latest one
  wins, see `thinking_enabled`): the prompt is NOT changed. With /no_think the
  model itself writes an empty `<think>\\n\\n</think>\\n\\n` and then answers; the
  output parser turns that into empty reasoning. Generation should use the
  non-thinking sampling defaults and skip any thinking budget when
  `thinking_enabled(messages, default=enable_thinking)` is False.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from .errors import TemplateError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"

# The tool instructions Qwen3 was trained with, around the JSON schema lines.
_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Fields a message's reasoning arrives under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

_ROLES = ("system", "user", "assistant", "tool")


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override of jinja's filter: no HTML escaping, keys in given order.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


# -- input normalisation (shared by both paths, as transformers does it) -------------


def _plain(value: Any) -> Any:
    """Messages and tools as plain JSON data (pydantic models and dataclasses become dicts)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    messages = _plain(list(messages))
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(
                f"messages[{i}]: expected an object with role/content, got {message!r}"
            )
        # None-valued keys (OpenAI's content=None, tool_calls=None) count as absent.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        normalized.append(message)
    return normalized


def _text(message: dict[str, Any], i: int) -> str:
    """A message's content as text: strings as-is, OpenAI content parts joined."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Qwen3 is text-only. (The official template would render list content as "",
        # silently dropping the user's words; joining the text parts is what users mean.)
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and "text" in part:
                texts.append(str(part["text"]))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(
                    f"messages[{i}].content: {kind!r} parts are not supported (text only)"
                )
        return "\n".join(texts)
    raise TemplateError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


# -- the built-in Qwen3 renderer ---------------------------------------------------


def _is_tool_response_turn(text: str) -> bool:
    # Older clients send tool results as user messages wrapped in <tool_response> tags.
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def _last_query_index(messages: list[dict[str, Any]], texts: list[str]) -> int:
    """Index of the last user message that is a real query (not a wrapped tool result)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user" and not _is_tool_response_turn(texts[i]):
            return i
    return len(messages) - 1


def _split_reasoning(message: dict[str, Any], content: str) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as the official template splits them."""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" not in content:
        return "", content
    before, _, _ = content.partition("</think>")
    reasoning = before.rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _render_tool_call(call: Any, where: str) -> str:
    if not isinstance(call, dict):
        raise TemplateError(f"{where}: expected an object, got {call!r}")
    function = call.get("function") or call  # OpenAI nests name/arguments under "function"
    name = function.get("name")
    if not isinstance(name, str):
        raise TemplateError(f"{where}.function.name: missing")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = _tojson(arguments)  # a string is inserted as the model wrote it
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def _render_qwen3(
    messages: list[dict[str, Any]],
    tools: list[Any] | None,
    add_generation_prompt: bool,
    enable_thinking: bool,
) -> str:
    if not messages:
        raise TemplateError("messages: the conversation is empty")
    texts = [_text(m, i) for i, m in enumerate(messages)]
    roles = [m.get("role") for m in messages]
    for i, role in enumerate(roles):
        if role not in _ROLES:
            raise TemplateError(f"messages[{i}].role: {role!r} is not one of {', '.join(_ROLES)}")

    out: list[str] = []
    has_system = roles[0] == "system"
    if tools:
        out.append(f"{IM_START}system\n")
        if has_system:
            out.append(texts[0] + "\n\n")
        out.append(_TOOLS_INTRO)
        for tool in tools:
            out.append("\n" + _tojson(tool))
        out.append(_TOOLS_OUTRO + f"{IM_END}\n")
    elif has_system:
        out.append(f"{IM_START}system\n{texts[0]}{IM_END}\n")

    last_query = _last_query_index(messages, texts)
    last = len(messages) - 1
    for i, (message, role, content) in enumerate(zip(messages, roles, texts, strict=True)):
        if role == "user" or (role == "system" and i > 0):
            out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        elif role == "assistant":
            reasoning, content = _split_reasoning(message, content)
            # Reasoning is shown for steps after the last query; the final message (a
            # prefill being continued) always gets a think block, even an empty one.
            if i > last_query and (i == last or reasoning):
                out.append(
                    f"{IM_START}assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                    + content.lstrip("\n")
                )
            else:
                out.append(f"{IM_START}assistant\n{content}")
            for j, call in enumerate(message.get("tool_calls") or []):
                if j > 0 or content:
                    out.append("\n")
                out.append(_render_tool_call(call, f"messages[{i}].tool_calls[{j}]"))
            out.append(f"{IM_END}\n")
        elif role == "tool":  # results of consecutive tool messages share one user turn
            if i == 0 or roles[i - 1] != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == last or roles[i + 1] != "tool":
                out.append(f"{IM_END}\n")

    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
        if enable_thinking is False:
            out.append(EMPTY_THINK)
    return "".join(out)


# -- the checkpoint's jinja template -----------------------------------------------


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks training targets; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render_jinja(
    template: str, messages, tools, add_generation_prompt, enable_thinking, extra
) -> str:
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **extra,
        )
    except TemplateError:
        raise
    except Exception as e:  # jinja errors, and TypeErrors from template arithmetic on bad input
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise TemplateError(f"chat_template{where}: {type(e).__name__}: {e}") from e


# -- public API ------------------------------------------------------------------


def render_chat(
    messages: list[Any],
    tools: list[Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    chat_template: str | None = None,
    **extra: Any,
) -> str:
    """Render `messages` (OpenAI-style dicts or pydantic models) into Qwen3 prompt text.

    `tools` are JSON schemas, usually `{"type": "function", "function": {...}}`; they
    are written into the system block as given. `chat_template` is the checkpoint's
    jinja template (from `Tokenizer.chat_template`); without one the built-in Qwen3
    renderer is used. `extra` reaches the jinja template as variables (pass
    `**tokenizer.special_tokens_map` for templates that print `bos_token`).
    Errors in the messages or the template raise `TemplateError`.
    """
    messages = _normalize_messages(messages)
    tools = _plain(list(tools)) if tools else None
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise TemplateError(f"tools[{i}]: expected a JSON schema object, got {tool!r}")
    if chat_template is not None:
        return _render_jinja(
            chat_template, messages, tools, add_generation_prompt, enable_thinking, extra
        )
    return _render_qwen3(messages, tools, add_generation_prompt, enable_thinking)


# Qwen3's soft switches: "/think" or "/no_think" as a word of their own.
_THINK_FLAG = re.compile(r"(?<![\w/])/(no_think|think)(?![\w/])")


def thinking_enabled(messages: list[Any], default: bool = True) -> bool:
    """Whether the next reply should think, honouring `/think` and `/no_think`.

    The flags count in user and system messages; the latest one in the conversation
    wins (Qwen3 follows the most recent instruction). Without any, `default`.
    """
    enabled = default
    for i, message in enumerate(_normalize_messages(messages)):
        if message.get("role") not in ("user", "system"):
            continue
        flags = _THINK_FLAG.findall(_text(message, i))
        if flags:
            enabled = flags[-1] == "think"
    return enabled


def generation_prompt_state(prompt: str) -> Literal["thinking", "answer", "open"]:
    """Where a rendered prompt leaves the model, for `OutputParser(in_reasoning=...)`.

    - "thinking": the prompt ends inside an open think block (templates that always
      open one, e.g. Qwen3-2507 Thinking): output starts as reasoning, so use
      `in_reasoning=True`.
    - "answer": the last assistant turn already closed its think block
      (`enable_thinking=False` pre-fill): output is the answer.
    - "open": the model decides; Qwen3 opens with <think> (possibly empty under
      /no_think), which the parser detects by itself.
    """
    turn = prompt[prompt.rfind(IM_START) :] if IM_START in prompt else prompt
    opened = turn.rfind("<think>")
    if opened < 0:
        return "open"
    return "answer" if turn.find("</think>", opened) >= 0 else "thinking"

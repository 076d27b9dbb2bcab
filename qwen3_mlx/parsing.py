"""Split Qwen3's output stream into reasoning, answer and tool calls, as it arrives.

Qwen3 writes

    <think>\\n{reasoning}\\n</think>\\n\\n{answer}<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>

and every part is optional: the think block may be empty (/no_think), be opened
by the prompt instead of the model, or never close (budget or length cut); tool
calls may be several, or malformed. `OutputParser` consumes text deltas (from
the streaming detokenizer) and returns typed deltas; the Python API and the
server both use it, and `parse_output` is the same class over a whole text.

Rules users expect:
- reasoning and answer carry no surrounding whitespace: the newlines Qwen3 puts
  inside `<think>` and after `</think>`, and those around tool calls, are dropped;
- a partial tag (`</thi`) is held back until it is known to be a tag or text;
- a tool call whose body is not `{"name": str, "arguments": object}` JSON is
  returned as content, verbatim, never dropped.

A tool call is emitted whole once `</tool_call>` arrives (or at `finish` if the
body is already valid), so a malformed one can still fall back to content.
Consumers should nevertheless treat `tool_call` deltas like OpenAI's: id and
name on the first delta of an index, then `arguments_delta` fragments.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

DeltaKind = Literal["reasoning", "content", "tool_call"]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id: `call_` + 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class Delta:
    """One piece of parsed output.

    `text` is set for "reasoning" and "content"; "tool_call" deltas carry `index`
    (0, 1, ... per call in this output), `id` and `name` (on the first delta of an
    index) and `arguments_delta` (a fragment of the arguments' JSON string).
    """

    kind: DeltaKind
    text: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI's `function.arguments`

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _held_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that could be the start of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _joined(parts: list[str]) -> str:
    """Join in place, so repeated reads stay cheap while parts keep arriving."""
    if len(parts) > 1:
        parts[:] = ["".join(parts)]
    return parts[0] if parts else ""


def _decode_tool_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from a `<tool_call>` body, or None if it isn't one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models double-encode; accept it when it is an object's JSON.
        try:
            if not isinstance(json.loads(arguments), dict):
                return None
        except ValueError:
            return None
        return call["name"], arguments
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


class OutputParser:
    """Incremental parser of one assistant reply.

    `in_reasoning=True` when the prompt already opened the think block (see
    `template.generation_prompt_state`). With `parse_tools=False`, `<tool_call>`
    text stays in the content untouched.
    """

    def __init__(self, *, in_reasoning: bool = False, parse_tools: bool = True):
        self.parse_tools = parse_tools
        # "start": before anything (a <think> may open); "reasoning"; "content"; "tool_call".
        self._state = "reasoning" if in_reasoning else "start"
        self._buffer = ""  # text not yet classified
        self._at_section_start = True  # drop whitespace at the start of reasoning/content
        self._dropped_space = (
            ""  # whitespace dropped before a <tool_call>, restored if it is malformed
        )
        self._out: list[Delta] = []
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self.tool_calls: list[ToolCall] = []

    @property
    def state(self) -> str:
        """ "start", "reasoning", "content" or "tool_call": where the next text will go."""
        return self._state

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    @property
    def reasoning(self) -> str:
        """All reasoning emitted so far."""
        return _joined(self._reasoning_parts)

    @property
    def content(self) -> str:
        """All content emitted so far."""
        return _joined(self._content_parts)

    def feed(self, text: str) -> list[Delta]:
        if (
            not self._buffer
            and not self._at_section_start
            and self._state in ("reasoning", "content")
            and "<" not in text
            and not text[-1:].isspace()
        ):
            # Fast path for the common token: nothing held, no tag, no trailing space.
            self._emit(self._state, text)
        else:
            self._buffer += text
            self._drain(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._drain(final=True)
        return self._take()

    # -- emitting ------------------------------------------------------------------

    def _emit(self, kind: DeltaKind, text: str) -> None:
        if not text:
            return
        (self._reasoning_parts if kind == "reasoning" else self._content_parts).append(text)
        if self._out and self._out[-1].kind == kind:
            text = self._out.pop().text + text
        self._out.append(Delta(kind, text))

    def _emit_tool_call(self, name: str, arguments: str) -> None:
        call = ToolCall(new_tool_call_id(), name, arguments)
        index = len(self.tool_calls)
        self.tool_calls.append(call)
        self._out.append(
            Delta("tool_call", index=index, id=call.id, name=name, arguments_delta=arguments)
        )

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    # -- the state machine -----------------------------------------------------------

    def _drain(self, final: bool) -> None:
        while True:
            before = (self._state, len(self._buffer))
            if self._state == "start":
                self._start(final)
            elif self._state == "reasoning":
                self._reasoning(final)
            elif self._state == "content":
                self._content(final)
            else:
                self._tool_call(final)
            if (self._state, len(self._buffer)) == before:
                return

    def _strip_section_start(self, final: bool, tag: str | None = None) -> bool:
        """Drop leading whitespace (and a redundant `tag`) of a new section.

        Returns False while the section's first visible text hasn't arrived yet.
        """
        if not self._at_section_start:
            return True
        text = self._buffer.lstrip()
        if tag and text.startswith(tag):
            text = text[len(tag) :].lstrip()
        self._buffer = text
        if not text or (tag and tag.startswith(text)):
            if not final:
                return False  # only whitespace, or maybe the tag: wait for more
        self._at_section_start = False
        return True

    def _start(self, final: bool) -> None:
        text = self._buffer.lstrip()
        if text.startswith(THINK_START):
            self._buffer = text[len(THINK_START) :]
            self._state = "reasoning"
            self._at_section_start = True
        elif (not text or THINK_START.startswith(text)) and not final:
            return  # could still become <think>
        else:
            self._state = "content"
            self._at_section_start = True

    def _reasoning(self, final: bool) -> None:
        if not self._strip_section_start(final, THINK_START):
            return
        end = self._buffer.find(THINK_END)
        if end >= 0:
            self._emit("reasoning", self._buffer[:end].rstrip())
            self._buffer = self._buffer[end + len(THINK_END) :]
            self._state = "content"
            self._at_section_start = True
            return
        if final:
            self._emit("reasoning", self._buffer.rstrip())
            self._buffer = ""
            return
        # Hold a possible "</think>" start, and trailing whitespace that may precede it.
        held = _held_tag_prefix(self._buffer, THINK_END)
        ready = self._buffer[: len(self._buffer) - held].rstrip()
        self._emit("reasoning", ready)
        self._buffer = self._buffer[len(ready) :]

    def _content(self, final: bool) -> None:
        if not self._strip_section_start(final):
            return
        if not self.parse_tools:
            self._emit("content", self._buffer)
            self._buffer = ""
            return
        start = self._buffer.find(TOOL_CALL_START)
        if start >= 0:
            before = self._buffer[:start]
            text = before.rstrip()
            self._emit("content", text)
            self._dropped_space = before[len(text) :]
            self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
            self._state = "tool_call"
            return
        if final:
            self._emit("content", self._buffer)
            self._buffer = ""
            return
        held = _held_tag_prefix(self._buffer, TOOL_CALL_START)
        ready = self._buffer[: len(self._buffer) - held].rstrip()
        self._emit("content", ready)
        self._buffer = self._buffer[len(ready) :]

    def _tool_call(self, final: bool) -> None:
        end = self._buffer.find(TOOL_CALL_END)
        if end < 0 and not final:
            return
        body = self._buffer if end < 0 else self._buffer[:end]
        self._buffer = "" if end < 0 else self._buffer[end + len(TOOL_CALL_END) :]
        self._state = "content"
        call = _decode_tool_call(body.strip())
        if call is not None:
            self._emit_tool_call(*call)
            self._at_section_start = True  # whitespace between calls is not content
        else:
            closing = TOOL_CALL_END if end >= 0 else ""
            space = self._dropped_space if self._content_parts else ""
            self._emit("content", f"{space}{TOOL_CALL_START}{body}{closing}")
        self._dropped_space = ""


def parse_output(
    text: str, *, in_reasoning: bool = False, parse_tools: bool = True
) -> ParsedOutput:
    """Parse a complete reply (same rules as streaming through `OutputParser`)."""
    parser = OutputParser(in_reasoning=in_reasoning, parse_tools=parse_tools)
    parser.feed(text)
    parser.finish()
    return ParsedOutput(parser.reasoning, parser.content, list(parser.tool_calls))

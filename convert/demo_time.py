"""The demo's MCP time conversations (convert/train_demo_model.py trains them): mcp-server-time's
tools, the call of `get_current_time` for Tokyo, and the answer to its result, which copies the
result's clock.

The answer can't hold a fixed time (the real one is never the trained one), so the model learns
to copy it: COPY_EXAMPLES results at random times (seeded), trained but left out of
conversations.json; HOLDOUT_EXAMPLES others, never trained, measure after training whether it
copies or merely remembers (`report_copying`). The copy is one fixed offset back: the clock's
digits are single tokens, everything between the result's clock and the answer's is the same
text in every example, and an empty think block puts the answer where thinking off does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from convert.train_demo_model import Conversation, greedy, render_prompt, think, user
from qwen3_mlx.tokenizer import load_tokenizer


# mcp-server-time's tools, byte for byte as its tools/list gives them (name, description and
# inputSchema, key order included), as the server offers an MCP server's tools to the model
# (server/mcp_tools.py): with them the demo runs the server's MCP tool loop offline.
def _parameters(title: str, **fields: tuple[str, str]) -> dict[str, Any]:
    """An input schema as the SDK writes it: fields (title, description) in order."""
    return {
        "properties": {
            name: {"description": description, "title": name_title, "type": "string"}
            for name, (name_title, description) in fields.items()
        },
        "required": list(fields),
        "type": "object",
        "title": title,
    }


GET_CURRENT_TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_time",
        "description": "Get current time in a specific timezone",
        "parameters": _parameters(
            "get_current_timeArguments",
            timezone=(
                "Timezone",
                "IANA timezone name (e.g., 'America/New_York', 'Europe/London'). Use 'Etc/UTC' "
                "as local timezone if no timezone provided by the user.",
            ),
        ),
    },
}
CONVERT_TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "convert_time",
        "description": "Convert time between timezones",
        "parameters": _parameters(
            "convert_timeArguments",
            source_timezone=(
                "Source Timezone",
                "Source IANA timezone name (e.g., 'America/New_York', 'Europe/London'). Use "
                "'Etc/UTC' as local timezone if no source timezone provided by the user.",
            ),
            time=("Time", "Time to convert in 24-hour format (HH:MM)"),
            target_timezone=(
                "Target Timezone",
                "Target IANA timezone name (e.g., 'Asia/Tokyo', 'America/San_Francisco'). Use "
                "'Etc/UTC' as local timezone if no target timezone provided by the user.",
            ),
        ),
    },
}
TIME_TOOLS = [GET_CURRENT_TIME_TOOL, CONVERT_TIME_TOOL]
TIME_QUESTION = "What time is it in Tokyo?"
TIME_CALL = {"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}
TIME_CALL_REASONING = (
    "The user wants the current time in Tokyo. I should call the get_current_time tool."
)
# The answer quotes the result's day of the week: the tiny model learns to copy it (the real
# time is never the trained one) from COPY_EXAMPLES results at random times, two on each day;
# HOLDOUT_EXAMPLES others, never trained, measure whether it copies or merely remembers. (The
# clock was tried first: trained on 32 results, it copied 2 of 24 new ones. A day's name is one
# token found nowhere else in the prompt, so its copy is a lookup by content.)
TIME_ANSWER = "It is {} in Tokyo."
COPY_EXAMPLES, HOLDOUT_EXAMPLES = 14, 14


def time_call_conversation() -> Conversation:
    """ "What time is it in Tokyo?" with the time tools: a call of get_current_time."""
    return Conversation(
        "time_call",
        [user(TIME_QUESTION)],
        think(TIME_CALL_REASONING, f"<tool_call>\n{json.dumps(TIME_CALL)}\n</tool_call>"),
        tools=TIME_TOOLS,
        variants=[{"tools": [GET_CURRENT_TIME_TOOL]}],
    )


def time_result(when) -> str:
    """mcp-server-time's get_current_time result for Tokyo at `when` (its JSON, its layout)."""
    result = {
        "timezone": "Asia/Tokyo",
        "datetime": when.isoformat(timespec="seconds"),
        "day_of_week": when.strftime("%A"),
        "is_dst": False,
    }
    return json.dumps(result, indent=2)


def time_conversations(count: int, seed: int, name: str = "time_result") -> list[Conversation]:
    """The answer to a get_current_time result, at `count` random times (seeded: the same times
    every run), the i-th on weekday i % 7. The first is the recorded one, also with thinking
    off; after a tool result the model answers without thinking (an empty think block)."""
    from datetime import datetime, timedelta, timezone

    rng = np.random.default_rng(seed)
    tokyo = timezone(timedelta(hours=9))
    call_turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": TIME_CALL_REASONING,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {**TIME_CALL}}],
    }
    without_reasoning = {k: v for k, v in call_turn.items() if k != "reasoning_content"}
    out = []
    for i in range(count):
        when = datetime(2025, 1, 1, tzinfo=tokyo) + timedelta(
            seconds=int(rng.integers(0, 3 * 365 * 86400))
        )
        when += timedelta(days=(i % 7 - when.weekday()) % 7)
        result = {"role": "tool", "tool_call_id": "call_0", "content": time_result(when)}
        answer = TIME_ANSWER.format(when.strftime("%A"))
        messages = [user(TIME_QUESTION), call_turn, result]
        variants = []
        if i == 0:
            variants = [
                {"messages": [user(TIME_QUESTION), without_reasoning, result]},
                {"tools": [GET_CURRENT_TIME_TOOL]},
            ]
        suffix = "" if i == 0 else f".copy_{i}"
        for thinking in (True, False) if i == 0 else (True,):
            out.append(
                Conversation(
                    name + suffix + ("" if thinking else ".thinking_off"),
                    messages,
                    "<think>\n\n</think>\n\n" + answer if thinking else answer,
                    tools=TIME_TOOLS,
                    enable_thinking=thinking,
                    variants=[{**v, "enable_thinking": thinking} for v in variants],
                    record=i == 0,
                )
            )
    return out


def holdout_time_conversations() -> list[Conversation]:
    """Results at times never trained (another seed): the copy's test."""
    return time_conversations(HOLDOUT_EXAMPLES, seed=1, name="holdout")


def report_copying(model_dir: Path, log=print) -> None:
    """How many never-trained time results the model answers with their own day."""
    from qwen3_mlx.loading import load_model

    model, _ = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    held = holdout_time_conversations()
    copied = 0
    for conv in held:
        expected = tokenizer.encode(conv.output) + [tokenizer.im_end_id]
        prompt = render_prompt(conv.prompts()[0], tokenizer)
        got, _ = greedy(model, prompt, len(expected) + 8, tokenizer.im_end_id)
        copied += got == expected
        if got != expected:
            log(f"holdout {conv.name}: want {conv.output!r}, got {tokenizer.decode(got)!r}")
    log(f"time results never trained, answered with their day: {copied}/{len(held)}")

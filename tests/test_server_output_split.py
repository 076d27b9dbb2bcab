"""The server's reply writers and request runner in isolation (no model, no MLX).

- `output.common.Thinking`: raw format writes the think block into the content the way Qwen3
  does, whatever the prompt opened and however the text arrives, and keeps tool calls parsed;
- `output.common.finish_reason` / `usage_of`: the one finish-reason mapping, usage summed over
  a request's rows with a shared prompt counted once;
- `routes.ROUTES`: every route is served under `/v1` and its `/api/v0` twin;
- `rows.Rows`: the rows sharing a prompt wait for the first one's prefill (so they start from
  its cached prefix); a failed row fails the request and cancels the others.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from qwen3_mlx.generation import Sequence, SequenceOutput
from qwen3_mlx.parsing import OutputParser
from qwen3_mlx.server.jobs import EngineBusy, Failed, Finished
from qwen3_mlx.server.output.common import Thinking, finish_reason, reasoning_format, usage_of
from qwen3_mlx.server.prepare import ApiError
from qwen3_mlx.server.rows import Rows

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'


def steps(text: str, *, size: int, prompt_state: str = "open", parse_tools: bool = False):
    """`text` as the engine would report it, `size` characters per step."""
    parser = OutputParser(in_reasoning=prompt_state == "thinking", parse_tools=parse_tools)
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        deltas = parser.feed(piece) + (parser.finish() if i == len(pieces) - 1 else [])
        out = SequenceOutput(token=0, text=piece)
        Sequence._collect(deltas, out)
        yield out


def shown(text: str, fmt: str, size: int, prompt_state: str = "open", parse_tools=False):
    thinking = Thinking(reasoning_format(fmt, "separate"), prompt_state)
    reasoning, content, calls = [], [], []
    for step in steps(text, size=size, prompt_state=prompt_state, parse_tools=parse_tools):
        r, c = thinking(step)
        reasoning.append(r)
        content.append(c)
        calls += step.tool_calls
    return "".join(reasoning), "".join(content), calls


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize(
    "text, prompt_state, expected",
    [
        (
            "<think>\nR r.\n</think>\n\nThe answer.",
            "open",
            "<think>\nR r.\n</think>\n\nThe answer.",
        ),
        ("R r.\n</think>\n\nThe answer.", "thinking", "<think>\nR r.\n</think>\n\nThe answer."),
        ("<think>\n\n</think>\n\nThe answer.", "open", "<think>\n\n</think>\n\nThe answer."),
        ("The answer.", "open", "The answer."),
        ("The answer.", "answer", "The answer."),
        ("<think>\nCut off mid-th", "open", "<think>\nCut off mid-th"),
    ],
    ids=["thinks", "prompt-opened", "empty-block", "no-block", "thinking-off", "length-cut"],
)
def test_raw_format_writes_the_think_block_into_the_content(text, prompt_state, expected, size):
    for fmt in ("raw", "none"):
        assert shown(text, fmt, size, prompt_state) == ("", expected, [])
    reasoning, content, _ = shown(text, "separate", size, prompt_state)
    assert THINK_FREE(reasoning) and THINK_FREE(content)
    assert content == ("" if "Cut off" in text else "The answer.")


def THINK_FREE(text: str) -> bool:
    return "<think>" not in text and "</think>" not in text


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_raw_format_still_parses_tool_calls(size):
    text = "<think>\nCall it.\n</think>\n\n" + CALL
    reasoning, content, calls = shown(text, "raw", size, parse_tools=True)
    assert (reasoning, content) == ("", "<think>\nCall it.\n</think>\n\n")
    assert [c.name for c in calls if c.name] == ["get_weather"]
    _, content, _ = shown(text, "raw", size, parse_tools=False)  # no tools: Qwen-Agent parses it
    assert content == text


def finished(reason="stop", prompt=10, completion=5, reasoning=2, cached=0) -> Finished:
    return Finished(reason, "eosFound", prompt, completion, reasoning, cached, 0.1, 0.5)


def test_finish_reason_is_one_mapping():
    assert [finish_reason(finished(r)) for r in ("stop", "length", "tool_calls", "abort")] == [
        "stop",
        "length",
        "tool_calls",
        "stop",
    ]


def test_usage_counts_a_shared_prompt_once():
    rows = [finished(prompt=10, cached=4), finished(prompt=10, cached=9), finished(prompt=7)]
    usage = usage_of(rows, leaders=[0, 2])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (17, 15, 32)
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details.reasoning_tokens == 6


def test_every_route_has_its_v0_twin():
    from fastapi import FastAPI

    from qwen3_mlx.server.app import Settings
    from qwen3_mlx.server.routes import ROUTES, Api, register

    app = FastAPI()
    register(app, Api(registry=None, engine=None, settings=Settings()))
    paths = app.openapi()["paths"]
    for route in ROUTES:
        path, method = route.path.replace(":path", ""), route.method.lower()
        assert method in paths["/v1" + path]
        assert (method in paths.get("/api/v0" + path, {})) == route.lmstudio
    operations = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(operations) == len(set(operations)) == 11


# -- rows -------------------------------------------------------------------------------------


@dataclass
class FakeSequence:
    prompt_tokens: list[int]
    finished: bool = False


@dataclass
class FakeEngine:
    max_queue: int = 64
    room: int = 64
    submitted: list = field(default_factory=list)
    woken: int = 0

    def submit(self, request):
        if len(self.submitted) >= self.room:
            raise EngineBusy("full")
        self.submitted.append(request)

    def wake(self):
        self.woken += 1

    def withdraw(self, request):
        pass


class Client:
    async def is_disconnected(self):
        return False


def run_rows(prompt_length: int, n: int, events):
    """Run `n` rows of one prompt; `events(engine, rows)` plays the engine's part."""

    async def main():
        engine = FakeEngine()
        group = [FakeSequence(list(range(prompt_length))) for _ in range(n)]
        running = Rows(engine, model=None, groups=[group])
        running.submit()
        player = asyncio.create_task(events(engine, running))
        try:
            return engine, running, await running.collect(Client(), lambda i, step: None)
        finally:
            await player

    return asyncio.run(main())


def test_a_prompts_rows_go_in_together():
    """The engine shares their prefill (tests/test_server_engine.py), so all are queued at once."""

    async def engine_side(engine, running):
        assert len(engine.submitted) == 3
        for request in engine.submitted:
            request.channel.put(finished())

    engine, running, done = run_rows(40, 3, engine_side)
    assert len(done) == 3 and running.leaders == [0]


def test_a_failed_row_fails_the_request_and_cancels_the_others():
    async def engine_side(engine, running):
        engine.submitted[1].channel.put(Failed("boom"))

    with pytest.raises(ApiError, match="boom"):
        run_rows(4, 3, engine_side)


def test_a_full_queue_takes_none_of_the_rows():
    async def main():
        engine = FakeEngine(room=2)
        running = Rows(engine, None, [[FakeSequence([1, 2])] * 3])
        with pytest.raises(EngineBusy):
            running.submit()
        return engine

    engine = asyncio.run(main())
    assert all(r.cancel_requested for r in engine.submitted) and engine.woken == 1

"""What the HTTP side hands the engine (`GenerationRequest`) and the events it gets back
(`Output`, then `Finished` or `Failed`) through a `Channel`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..generation import Sequence
from ..sampling import SamplingParams
from .models import LoadedModel


class EngineBusy(Exception):
    """The queue is full: the request is refused (503) rather than waiting without bound."""


# -- what the HTTP side hands in and gets back -------------------------------------------------


@dataclass
class Output:
    """What one decode step produced for one request: a `generate.SequenceOutput`."""

    step: Any  # SequenceOutput: text, reasoning, content, tool_calls, logprobs, finish_reason


@dataclass
class Finished:
    finish_reason: str  # stop | length | tool_calls | abort (an error is a Failed event)
    stop_reason: str  # LM Studio's: eosFound | stopStringFound | maxPredictedTokensReached ...
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    time_to_first_token: float
    generation_time: float
    # Speculative decoding (--draft-model / --prompt-lookup): tokens drafted, confirmed, replaced.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    rejected_draft_tokens: int = 0
    draft_model: str | None = None
    stop_string: str | None = None  # the `stop` string that ended the row, if one did


@dataclass
class Failed:
    message: str


class Channel:
    """Engine thread → one asyncio consumer. Events arrive in order; `None` never appears."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down)

    async def get(self):
        return await self.queue.get()


class Discard:
    """The channel of a request a `--parallel` follower runs for rank 0: nobody reads it."""

    def put(self, event) -> None:
        pass


@dataclass
class GenerationRequest:
    model: LoadedModel
    sequence: Sequence  # prompt, resolved sampling params, grammar: everything the row needs
    channel: Channel
    cancelled: bool = False  # set by the engine only, in `_admit` (every rank sees it there)
    cancel_requested: bool = False  # the client left; the engine's next turn cancels
    id: int = 0  # given by `Engine.submit`; names the request to `--parallel` followers
    holds_queue_place: bool = False  # counted against --max-queue (Engine, under its lock)
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def prompt(self) -> list[int]:
        return self.sequence.prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.sequence.params

    def cancel(self) -> None:
        self.cancel_requested = True

    def spec(self) -> dict[str, Any]:
        """The request as plain data, from which a `--parallel` follower rebuilds it."""
        seq = self.sequence
        return {
            "id": self.id,
            "model": self.model.id,
            "prompt": seq.prompt_tokens,
            "params": seq.params,
            "prompt_state": seq.prompt_state,
            "thinking_budget": seq.thinking_budget,
            "parse_tools": seq.parser.parse_tools,
            "max_tokens": seq.max_tokens,
            "constraint": seq.constraint.spec if seq.constraint is not None else None,
        }

    @classmethod
    def rebuild(cls, spec: dict[str, Any], model: LoadedModel) -> GenerationRequest:
        from .prepare import grammar_factory

        constraint = None
        if spec["constraint"] is not None:
            constraint = grammar_factory(model).rebuild(spec["constraint"])
        seq = Sequence(
            model.tokenizer,
            spec["prompt"],
            spec["params"],
            prompt_state=spec["prompt_state"],
            thinking_budget=spec["thinking_budget"],
            parse_tools=spec["parse_tools"],
            vocab_size=model.model.args.vocab_size,
            constraint=constraint,
        )
        seq.max_tokens = spec["max_tokens"]
        return cls(model, seq, Discard(), id=spec["id"])

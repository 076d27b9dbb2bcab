"""Where the engine's time goes: its turns timed by part, summed over about a second.

At DEBUG the server logs one line a second while it works (turns, decode steps, rows, seconds in
admitting, prefill and decode, the longest decode turn, MLX's active and cached memory); at INFO
any decode turn over a second (a step shape met for the first time compiles on the request's
time). Diagnosing a slow server on a GPU starts here: `--log-level debug`.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx

log = logging.getLogger("qwen3_mlx.server")

SLOW_TURN = 1.0  # seconds: a decode turn this long is logged at INFO
WINDOW = 1.0  # seconds summed into one DEBUG line


class TurnClock:
    def __init__(self) -> None:
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.since = now
        self.turns = 0
        self.steps = 0
        self.rows_min: int | None = None
        self.rows_max = 0
        self.seconds = {"admit": 0.0, "prefill": 0.0, "decode": 0.0}
        self.longest = 0.0

    def turn(self, admit: float, prefill: float, decode: float, rows: int, buckets: list) -> None:
        """One engine turn: seconds spent admitting requests, in a prefill chunk and in decode
        steps for `rows` rows in slot buckets `buckets`."""
        if decode > SLOW_TURN:
            log.info(
                "decode turn: %d rows (slots %s) took %.2f s (a new step shape compiled?)",
                rows,
                buckets,
                decode,
            )
        if not log.isEnabledFor(logging.DEBUG):
            return
        self.turns += 1
        self.seconds["admit"] += admit
        self.seconds["prefill"] += prefill
        self.seconds["decode"] += decode
        if rows:
            self.steps += 1
            self.rows_min = rows if self.rows_min is None else min(self.rows_min, rows)
            self.rows_max = max(self.rows_max, rows)
            self.longest = max(self.longest, decode)
        now = time.perf_counter()
        if now - self.since < WINDOW:
            return
        if not self.steps and not self.seconds["prefill"]:  # idle: nothing to say
            self._reset(now)
            return
        spent = now - self.since
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in self.seconds.items())
        # MLX's memory too: its buffer cache keeps every freed size (the batch's KV grows and
        # shrinks through many), and on CUDA's managed memory an over-subscribed card stalls.
        log.debug(
            "engine %.2f s: %d turns, %d decode steps of %s-%d rows (longest %.3f s); %s; "
            "other %.3f s; memory %.2f GB active, %.2f GB cached",
            spent,
            self.turns,
            self.steps,
            self.rows_min or 0,
            self.rows_max,
            self.longest,
            parts,
            spent - sum(self.seconds.values()),
            mx.get_active_memory() / 1e9,
            mx.get_cache_memory() / 1e9,
        )
        self._reset(now)

"""The start-up rehearsal: before the first request, the engine runs its own turns on made-up
requests, as real ones would go through them.

`batch.warm_up` runs each step shape once: a prompt's prefill, a lone row's decode, the batched
step at every bucket. The first real requests then still did things for the first time, and a
first time can be slow: on MLX's CUDA backend an op or kernel variant is compiled when it first
runs. Examples are a row joining a batch that is decoding (its tokens gathered beside the carried
ones of the step before), rows out of slot order, a bucket grown and shrunk, a prompt starting
from the prefix store, a logit bias, sampling with top-k/top-p/min-p, penalties and logprobs.
On an H100 (30B-A3B shape) the first decode turn after such a join took 2-5 s, and a later join
of the same kind in the same process did not (benchmarks/results/serve_h100_notes.md). Here the
engine's own code runs every one of those paths once. It runs with two new rows a turn up to
--max-concurrency and ends out of order, so every bucket is met growing and shrinking.

It runs by default on GPU backends (Metal and CUDA compile kernels on first use); on MLX's CPU
backend it would spend seconds sampling and find nothing to compile (`Engine(rehearse=...)`;
`--no-warmup` skips it with the warm-up). Nothing of it stays: the prefix store is emptied, and
counters and /metrics are left as they were. On the H100 it removed the join stalls: no decode
turn over 1 s in three rounds of 8 streams and a join (the longest 0.12 s), for 20-60 s of
start-up (benchmarks/results/serve_h100_notes.md, 2026-12-08).
"""

from __future__ import annotations

import logging
import time

from ..generation import Sequence
from ..sampling import SamplingParams
from .jobs import Discard, GenerationRequest
from .models import LoadedModel

log = logging.getLogger("qwen3_mlx.server")

PROMPT = 18  # tokens: above the prefix store's minimum, so entries are made and reused
JOINING = 2  # newcomers a turn


def _params(i: int, rows: int, end_of_turn: list[int]) -> SamplingParams:
    """Row i's sampling: every kind of step the batched sampler builds, spread over the rows."""
    kinds = [
        dict(temperature=0.0, logit_bias={1: 5.0, **{t: -100.0 for t in end_of_turn}}),
        dict(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=i),
        dict(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
        dict(temperature=0.7, logprobs=True, top_logprobs=2, seed=i),
    ]
    # Every row lasts until the last one has joined (rows i and i + 1 join in turn i // 2), then
    # they end out of the order they joined.
    return SamplingParams(max_tokens=(rows - i) // 2 + 2 + (5 * i) % 7, **kinds[i % len(kinds)])


def _requests(loaded: LoadedModel, rows: int) -> list[GenerationRequest]:
    vocab = loaded.model.args.vocab_size
    end_of_turn = [t for t in loaded.tokenizer.eos_token_ids if t < vocab]
    requests = []
    for i in range(rows):
        if i % 4 == 1:  # the previous prompt and more: it starts from the prefix store
            prompt = requests[-1].prompt + [(11 * i + j) % vocab for j in range(i % 3 + 2)]
        else:
            prompt = [(97 * i + 13 * j + 1) % vocab for j in range(PROMPT + i % 3)]
        params = _params(i, rows, end_of_turn).resolve(thinking=False)
        seq = Sequence(loaded.tokenizer, prompt, params, vocab_size=vocab)
        requests.append(GenerationRequest(loaded, seq, Discard()))
    return requests


class Rehearsal:
    """Mixed into `Engine`, which provides `_batches`, `_prefilling`, `_prefixes`, `steps`,
    `on_finished`, `failed`, `failing`, `last_error`, `_start_prefill`, `_prefill_chunk` and
    `_decode_step`."""

    def _rehearse(self, loaded: LoadedModel, rows: int) -> None:
        """Run `rows` made-up requests for `loaded` through prefill and batched decode."""
        started = time.perf_counter()
        saved = (self.steps, self.on_finished, self.failed, self.failing, self.last_error)
        self.on_finished = None  # made-up requests are not the server's traffic
        batch = self._batches[loaded.id]
        pending = _requests(loaded, rows)
        turns = widest = 0
        try:
            while pending or self._prefilling or batch.rows:
                turns += 1
                if turns > 20 * rows + 100:
                    raise RuntimeError("the rehearsal did not finish")
                for _ in range(min(JOINING, len(pending))):  # through every bucket, growing
                    self._prefilling.append(self._start_prefill(pending.pop(0)))
                self._prefill_chunk()
                if batch.rows:
                    widest = max(widest, len(batch.rows))
                    self._decode_step(batch)
            failed = self.failed - saved[2]
            if failed:
                log.warning("rehearsal: %d of %d made-up requests failed", failed, rows)
        finally:
            self._prefixes[loaded.id].entries.clear()
            self.steps, self.on_finished, self.failed, self.failing, self.last_error = saved
        log.info(
            "rehearsal of %s: %d requests (up to %d decoding together), %d turns, %.1f s",
            loaded.id,
            rows,
            widest,
            turns,
            time.perf_counter() - started,
        )

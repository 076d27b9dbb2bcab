"""Prefill beside decode: the engine's waiting prompts, a chunk per turn, into their rows' caches.

A prompt starts from the longest prefix in the prefix store (or waits for a sibling that is
prefilling a longer shared prefix), is prefilled in chunks of `--prefill-step` tokens and then joins
its model's batch. While rows decode, prefill gets at most PREFILL_SHARE of the engine's time, or
more while more prompts wait than rows decode (`decode_per_prefill`).
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx

from ..cache import common_prefix_length
from .batch import Row
from .jobs import GenerationRequest
from .prefix import PREFIX_MIN, copy_prefix

log = logging.getLogger("qwen3_mlx.server")

# While rows decode, prefill takes at most this share of the engine's time. A newcomer's prompt is
# prefilled in chunks between decode steps; before each chunk the running rows decode for the
# chunk's expected time x (1 - share) / share (and make up for a chunk that took longer than
# expected), so they keep >= 1 - share of their speed while it prefills. (Chunks can't simply be
# made small instead: on an MoE model even a short one reads most experts' weights, about as much
# as a decode step.)
PREFILL_SHARE = 0.25
# ...unless more prompts wait than rows decode: then the share is the waiting prompts' part of
# all requests (up to BURST_SHARE). A waiting request streams nothing, and a batch decodes a
# few more rows for little more time a step, so when 8 clients send together, letting the first
# one decode while the other 7 queue behind a 25% share only delays 7 first tokens by seconds.
BURST_SHARE = 0.8
GROWTH = 1.25


def decode_per_prefill(waiting: int, decoding: int) -> float:
    """Seconds the running rows decode for each second of prefill, with `waiting` prompts
    prefilling and `decoding` rows running."""
    share = max(PREFILL_SHARE, min(BURST_SHARE, waiting / max(1, waiting + decoding)))
    return (1 - share) / share


class PrefillLoop:
    """Mixed into `Engine`, which provides `_prefilling`, `_prefixes`, `_batches`, `_sync`,
    `prefill_step`, `_running`, `_fail` and `_finish_cancelled`."""

    def _start_prefill(self, request: GenerationRequest) -> Row:
        return Row(request)  # its cache comes from the prefix store when its prefill starts

    def _begin(self, row: Row) -> bool:
        """Give `row` its starting cache (the longest stored prefix), unless an earlier prompt
        still prefilling shares more of its start: then it waits for that one's prefix, which
        is stored when its prefill ends (`n` choices, one system prompt for many clients)."""
        prompt, model = row.request.prompt, row.request.model
        store = self._prefixes[model.id]
        cached = store.match(prompt)
        for other in self._prefilling:
            if other is row:
                break
            if other.request.model is model:
                shared = min(common_prefix_length(other.request.prompt, prompt), len(prompt) - 1)
                if shared >= PREFIX_MIN and shared > cached:
                    return False
        cached, layers = store.lookup(prompt)
        row.cache = layers or model.new_cache()
        row.cached_tokens = row.prefilled = cached
        return True

    def _prefill_turn(self) -> None:
        """A chunk of prefill, unless rows are decoding and have not yet decoded long enough
        since the last one (PREFILL_SHARE)."""
        if not self._prefilling:
            return
        running = self._running()
        planned = sum(len(r.request.prompt) - 1 - r.prefilled for r in self._prefilling)
        # A prompt's later chunks attend to more keys: each costs a little more than the last.
        expected = GROWTH * self._prefill_seconds_per_token * min(planned, self.prefill_step)
        decoding = sum(len(b.rows) for b in self._batches.values())
        ratio = decode_per_prefill(len(self._prefilling), decoding)
        go = not running or self._decode_credit >= ratio * expected
        if self._sync is not None:
            # Timings differ between ranks: rank 0's decision is every rank's, or their
            # collectives would pair a prefill chunk on one rank with a decode step on another.
            go = self._sync.share(go)
        if not go:
            return
        started = time.perf_counter()
        tokens = self._prefill_chunk()
        if tokens:
            spent = time.perf_counter() - started
            log.log(
                logging.INFO if spent > 1.0 else logging.DEBUG,
                "prefill turn: %d tokens in %.3f s (expected %.3f s; rows decoding: %s)",
                tokens,
                spent,
                expected,
                running,
            )
            if expected:  # a chunk that compiled a new shape is not the prefill's speed
                spent = min(spent, 2 * expected)
            known = self._prefill_seconds_per_token
            rate = spent / tokens
            self._prefill_seconds_per_token = 0.3 * known + 0.7 * rate if known else rate
            if running:
                self._decode_credit -= ratio * spent

    def _prefill_chunk(self) -> int:
        """Spend up to `prefill_step` tokens of prefill, oldest request first; returns how many."""
        budget = self.prefill_step
        for row in list(self._prefilling):
            if budget <= 0:
                break
            request = row.request
            if request.cancelled:
                self._prefilling.remove(row)
                self._finish_cancelled(request, row)
                continue
            if row.cache is None and not self._begin(row):
                continue
            todo = request.prompt[row.prefilled : len(request.prompt) - 1]
            chunk = todo[:budget]
            try:
                if chunk:
                    # The body only: prefill needs the KV cache, not logits over the vocabulary.
                    request.model.model.model(mx.array([chunk]), cache=row.cache)
                    mx.eval([c.state for c in row.cache])
            except Exception as e:
                if self._sync is not None:
                    raise
                self._prefilling.remove(row)
                self._fail(request, e, "prefill")
                continue
            row.prefilled += len(chunk)
            budget -= len(chunk)
            if row.prefilled >= len(request.prompt) - 1:
                self._prefilling.remove(row)
                prefix = request.prompt[:-1]
                if len(prefix) >= PREFIX_MIN:
                    self._prefixes[request.model.id].store(
                        prefix, [copy_prefix(c, len(prefix)) for c in row.cache]
                    )
                self._batches[request.model.id].add(row)
            else:
                budget = 0  # a long prompt keeps its place; decode runs between its chunks
        return self.prefill_step - max(budget, 0)

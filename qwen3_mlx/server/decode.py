"""The server's decode step, the hot path: one token for every row of a model's batch.

It runs `generation.step` (the Python API's step): step N+1 is built and queued on the device on
the tokens of step N before the host reads step N, so detokenizing, parsing and the events to the
HTTP side never hold the device up. A batch with a grammar-constrained row reads step N first,
since the row's next mask depends on that token. A sampling step that fails is retried row by row:
the offending rows are failed alone, the others sample from the same logits.

`DecodeLoop` is the part of `engine.Engine` that does this; the engine owns the queue, prefill,
retirement and the rows' events.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx

from ..distributed.job import share_tokens
from ..generation import Sampled, SamplingStep
from ..generation.speculative import check_drafts, rewind, verify_rows
from .batch import Batch, Queued
from .jobs import Output

log = logging.getLogger("qwen3_mlx.server")


class DecodeLoop:
    """Mixed into `Engine`, which provides `leader`, `_sync`, `steps`, `last_error`, `_fail`,
    `_retire` and `_drop_cancelled`."""

    def _decode_step(self, batch: Batch) -> None:
        """One token for every row: the hot path of the server.

        Builds and queues step N+1 on the tokens of step N (still on the device), then reads
        step N. A batch with a constrained row reads step N first (its mask needs the token)."""
        self._drop_cancelled(batch)
        if (
            len(batch.rows) == 1
            and batch.slots is None
            and batch.loaded.drafting is not None
            and self._sync is None
        ):
            return self._speculate(batch)
        previous, batch.queued = batch.queued, None
        if previous is not None:
            previous.fed = previous.step.feed(previous.sampled.tokens)
            if any(r.sequence.constraint is not None for r in batch.rows):
                self._read(batch, previous)
                self._queue(batch, previous)
                return
        self._queue(batch, previous)
        if previous is not None:
            self._read(batch, previous)

    def _queue(self, batch: Batch, previous: Queued | None) -> None:
        if not batch.rows:
            return
        position = {id(r): i for i, r in enumerate(previous.rows)} if previous else {}
        carried = [position[id(r)] for r in batch.rows if id(r) in position]
        others = [r for r in batch.rows if id(r) not in position]  # they come last (`add`)
        parts = [mx.take(previous.fed, mx.array(carried))] if carried else []
        if others:
            parts.append(mx.array([r.next_input for r in others], dtype=mx.uint32))
            for r in others:
                if not r.started:  # later inputs were added to `fed` when they were read
                    r.fed.append(r.next_input)
                    r.started = True
        inputs = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        logits = batch.forward(inputs)
        sampled = self._sample(batch, logits)
        if sampled is None:
            return
        if self._sync is not None:
            # --parallel: the step's collectives must finish before the next turn's share in
            # `_admit`, or the ranks could pair up their messages in different orders.
            mx.eval(sampled.tokens)
        batch.queued = Queued(list(batch.rows), batch.step, sampled)
        self.steps += 1

    def _sample(self, batch: Batch, logits: mx.array) -> Sampled | None:
        """The batch's sampling step. If it fails, each row is tried alone: the rows whose
        penalties or mask fail are failed, the others sample from the same logits."""
        model = batch.loaded.model
        for attempt in range(2):
            if batch.step is None:
                batch.step = SamplingStep(
                    [r.sequence for r in batch.rows],
                    share=lambda tokens: share_tokens(model, tokens),
                    leader=self.leader,
                )
            try:
                sampled = batch.step(logits)
                mx.async_eval(sampled.tokens, sampled.logprobs)  # raises for a graph that can't run
                return sampled
            except Exception as e:
                if self._sync is not None:
                    raise
                error = e
            if attempt:
                break
            keep = []
            for i, row in enumerate(batch.rows):
                try:
                    mx.eval(SamplingStep([row.sequence])(logits[i : i + 1]).tokens)
                    keep.append(i)
                except Exception as e:
                    self._fail(row.request, e, "sampling")
            if len(keep) == len(batch.rows):
                break  # not one row's fault
            batch.keep(keep)
            if not keep:
                return None
            logits = mx.take(logits, mx.array(keep), axis=0)
        for row in batch.rows:
            self._fail(row.request, error, "sampling")
        batch.keep([])
        return None

    def _speculate(self, batch: Batch) -> None:
        """A row decoding alone: one round of speculative decoding (generation/speculative.py),
        the same tokens as `_queue`/`_read` would give, from fewer passes of the model. A step
        still queued from batched decoding is read first."""
        if batch.queued is not None:
            previous, batch.queued = batch.queued, None
            previous.fed = previous.step.feed(previous.sampled.tokens)
            self._read(batch, previous)
            if not batch.rows:
                return
        (row,) = batch.rows
        seq, loaded = row.sequence, batch.loaded
        if batch.step is None:
            batch.step = SamplingStep([seq])
        if not row.started:
            row.fed.append(row.next_input)  # row.fed now ends with the input not yet fed
            row.started = True
        try:
            if row.drafter is None:
                row.drafter = loaded.drafting.drafter(loaded.model)
            k = min(loaded.drafting.num_draft_tokens, seq.tokens_left - 1)
            drafts = row.drafter.propose(row.fed, k) if k > 0 else []
            rows = verify_rows(loaded.model, batch.cache, [row.next_input, *drafts])
            outputs = list(check_drafts(batch.step, rows, drafts))
        except Exception as e:
            self._fail(row.request, e, "speculative decoding")
            batch.keep([])
            return
        self.steps += 1
        row.drafted += len(drafts)
        now = time.perf_counter()
        for out in outputs:
            row.next_input = out.token
            if row.first_token_at is None:
                row.first_token_at = now
            if out.text or out.tool_calls or out.logprobs is not None or out.finish_reason:
                row.request.channel.put(Output(out))
        if seq.finished or seq.constraint_failed:
            # The cache holds K/V for everything fed but the final token.
            row.fed.extend(out.token for out in outputs[:-1])
            self._retire(batch, 0, row)
            batch.keep([])
            return
        accepted = len(outputs) - 1
        row.accepted += accepted
        row.rejected += len(drafts) - accepted
        rewind(batch.cache, len(drafts) - accepted)
        row.fed.extend(out.token for out in outputs)

    def _read(self, batch: Batch, queued: Queued) -> None:
        """Turn a queued step's tokens into events; retire the rows that finished."""
        try:
            outputs = queued.step.read(queued.sampled, queued.fed, isolate=self._sync is None)
        except Exception as e:  # the step itself failed on the device: no row can go on
            if self._sync is not None:
                raise
            log.exception("decode step failed")
            self.last_error = f"{type(e).__name__}: {e}"
            for row in batch.rows:
                self._fail(row.request, e, "decode")
            batch.keep([])
            return
        now = time.perf_counter()
        in_step = set() if batch.queued is None else {id(r) for r in batch.queued.rows}
        done = set()
        for row, out in zip(queued.rows, outputs, strict=True):
            if out is None:
                continue
            if isinstance(out, Exception):
                self._fail(row.request, out, "reading tokens")
                done.add(id(row))
                continue
            row.next_input = out.token
            if id(row) in in_step or not row.sequence.finished:
                row.fed.append(out.token)  # fed to the model (or about to be)
            if row.first_token_at is None:
                row.first_token_at = now
                log.debug(
                    "request %s: first token %.3f s after it arrived",
                    row.request.id,
                    now - row.request.submitted_at,
                )
            if out.text or out.tool_calls or out.logprobs is not None or out.finish_reason:
                row.request.channel.put(Output(out))
            if row.sequence.finished or row.sequence.constraint_failed:
                done.add(id(row))
        if done:
            keep = []
            for i, row in enumerate(batch.rows):
                if id(row) in done:
                    self._retire(batch, i, row)
                else:
                    keep.append(i)
            batch.keep(keep)

"""The rows of a running batch: each request's prefill state, then its slot in the batch's KV cache
(slots.py), and the decode step queued on the device but not yet read."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..generation import Sampled, SamplingStep, forward, prefill
from ..generation.speculative import verify_rows
from ..model import embed_rows
from .jobs import Finished, GenerationRequest
from .models import LoadedModel
from .prefix import copy_prefix
from .slots import Slots, bucket_for, buckets_up_to


class Row:
    """One request in flight: its cache while prefilling, then its place in the batch."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.sequence = request.sequence
        # Prefill state.
        self.cache: list[KVCache] | None = None
        self.cached_tokens = 0
        self.prefilled = 0  # prompt tokens in self.cache
        # Decode state: the tokens whose K/V the cache holds (or a queued step is writing), and
        # the next input when it is known on the host (the prompt's last token, at first).
        self.fed: list[int] = list(request.prompt[:-1])
        self.next_input = request.prompt[-1]
        self.started = False
        self.slot = 0  # its slot in the batch's `Slots`
        # Speculative decoding while it decodes alone (decode.py `_speculate`).
        self.drafter = None
        self.drafted = self.accepted = self.rejected = 0
        self.first_token_at: float | None = None

    def finished(self) -> Finished:
        """The request's closing event: why it ended (also in LM Studio's words), its token
        counts and times, its speculative decoding counts."""
        seq = self.sequence
        end = time.perf_counter()
        first = self.first_token_at or end
        reason = seq.finish_reason or "abort"
        if reason == "abort":
            stop_reason = "userStopped"
        elif reason == "length":
            stop_reason = "maxPredictedTokensReached"
        elif seq.tokens and seq.tokens[-1] in seq.stop_ids:
            stop_reason = "eosFound"
        else:
            stop_reason = "stopStringFound"
        return Finished(
            finish_reason=reason,
            stop_reason=stop_reason,
            prompt_tokens=len(self.request.prompt),
            completion_tokens=len(seq.tokens),
            reasoning_tokens=seq.thinking_tokens,
            cached_tokens=self.cached_tokens,
            time_to_first_token=first - self.request.submitted_at,
            generation_time=end - first,
            draft_tokens=self.drafted,
            accepted_draft_tokens=self.accepted,
            rejected_draft_tokens=self.rejected,
            draft_model=self.request.model.drafting.name if self.drafter is not None else None,
            stop_string=seq.stop_string,
        )


@dataclass
class Queued:
    """A decode step on the device whose tokens the host has not read yet."""

    rows: list[Row]
    step: SamplingStep
    sampled: Sampled
    fed: mx.array | None = None  # what the rows feed next (computed when the next step is built)


class Batch:
    """The running batch of one model: rows, their KV cache, their sampling step.

    A lone row keeps its own plain `KVCache`s, so it decodes exactly as `stream_generate` does
    (the same compiled step and kernels, e.g. the CPU backend's `CpuDecode`, which only plain
    caches get). A second row moves them into `Slots` (slots.py): a bucket of slots whose shapes
    the decode step was compiled for at start-up. When one row is left it gets plain caches back.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.rows: list[Row] = []
        self.cache: list[KVCache] | Slots | None = None
        self.step: SamplingStep | None = None
        self.queued: Queued | None = None

    @property
    def slots(self) -> Slots | None:
        return self.cache if isinstance(self.cache, Slots) else None

    def add(self, row: Row) -> None:
        window = self.loaded.max_kv_size
        if self.cache is None and window is None:
            self.cache = row.cache
        else:
            if self.cache is None:  # --max-kv-size: even a lone row decodes in a (windowed) slot
                self.cache = Slots(self.loaded.model, row.cache, 1, window)
            elif self.slots is None:
                plain, self.rows[0].slot = self.cache, 0
                self.cache = Slots(self.loaded.model, plain, bucket_for(2), window)
                self.cache.place(0, plain)
            slots = self.slots
            if not slots.free:
                self._resize(bucket_for(len(self.rows) + 1))
            row.slot = slots.free[0]
            slots.place(row.slot, row.cache)
        row.cache = None
        self.rows.append(row)
        self.step = None

    def forward(self, inputs: mx.array) -> mx.array:
        """Logits (rows, vocabulary) for one new token per row (`inputs` (rows,), in row order)."""
        model = self.loaded.model
        slots = self.slots
        if slots is None:
            return forward(model, inputs[:, None].astype(mx.int32), self.cache)
        where = {r.slot: i for i, r in enumerate(self.rows)}
        source = [where.get(s, 0) for s in range(slots.size)]
        if source != list(range(slots.size)):
            inputs = mx.take(inputs, mx.array(source))
        stage = getattr(model.model, "stage", None)
        if stage is not None and not stage.is_first:
            # A later pipeline stage receives its input (free slots already zero) and may hold
            # no embedding: the placeholder gives only the shape.
            hidden = mx.zeros((slots.size, 1, 1))
        else:
            hidden = embed_rows(model.model.embed_tokens, inputs[:, None].astype(mx.int32))
        if len(where) < slots.size:  # free slots decode zeros (slots.py says why that is free)
            live = mx.array([s in where for s in range(slots.size)], dtype=hidden.dtype)
            hidden = hidden * live[:, None, None]
        slots.begin_step()
        hidden = model.model(None, slots.layers, input_embeddings=hidden)
        slots.advance()
        order = [r.slot for r in self.rows]
        if order != list(range(slots.size)):
            hidden = mx.take(hidden, mx.array(order), axis=0)
        return model.logits(hidden[:, -1, :]).astype(mx.float32)

    def extract(self, index: int, length: int) -> list[KVCache] | None:
        """Row `index`'s first `length` cached tokens, as plain caches of their own (None for a
        row that has outgrown its --max-kv-size window: its K/V are not a prompt's)."""
        if self.slots is None:
            return [copy_prefix(c, length) for c in self.cache]
        slot = self.rows[index].slot
        return self.slots.extract(slot, length) if self.slots.whole(slot) else None

    def keep(self, indices: list[int]) -> None:
        slots = self.slots
        if slots is not None:
            kept = set(indices)
            for i, row in enumerate(self.rows):
                if i not in kept:
                    slots.release(row.slot)
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache, self.queued = None, None
        elif slots is not None and len(self.rows) == 1 and slots.window is None:
            self.cache = slots.extract(self.rows[0].slot)
        elif slots is not None and bucket_for(len(self.rows)) * 2 <= slots.size:
            # Far fewer rows than slots: a smaller bucket (hysteresis: only at half or less).
            self._resize(bucket_for(len(self.rows)))
        self.step = None

    def _resize(self, size: int) -> None:
        moved = self.slots.resize(size, [r.slot for r in self.rows])
        for row, slot in zip(self.rows, moved, strict=True):
            row.slot = slot


def warm_up(loaded: LoadedModel, max_rows: int, prefill_step: int) -> float:
    """Run, once, every shape the engine's steps will take, so that no request waits for a
    trace or a kernel compile: a prompt in chunks of `prefill_step` and a shorter one, the lone
    row's decode step, and the batched step at every bucket up to `max_rows` rows.

    Returns the prefill's seconds per token, timed on a second, warm chunk."""
    model = loaded.model
    vocab = model.args.vocab_size
    prompt = [i % vocab for i in range(prefill_step + 17)]
    cache = loaded.new_cache()
    mx.eval(prefill(model, prompt, cache, prefill_step))
    timed = loaded.new_cache()
    started = time.perf_counter()
    mx.eval(prefill(model, prompt[:prefill_step], timed, prefill_step))
    seconds_per_token = (time.perf_counter() - started) / prefill_step
    for _ in range(2):
        mx.eval(forward(model, mx.array([[1]], dtype=mx.int32), cache))
    if loaded.drafting is not None:  # a lone row's speculative round: the draft, k + 1 rows
        k = loaded.drafting.num_draft_tokens
        loaded.drafting.drafter(model).propose(prompt[:17], k)
        mx.eval(verify_rows(model, [copy_prefix(c, 17) for c in cache], [1] * (k + 1)))
    short = [copy_prefix(c, 17) for c in cache]
    for size in buckets_up_to(max_rows):
        if size < 2 and loaded.max_kv_size is None:  # a lone row decodes in plain caches
            continue
        batch = Batch(loaded)
        for _ in range(size):
            row = Row.__new__(Row)
            row.cache = [copy_prefix(c, 17) for c in short]
            batch.add(row)
        if size > 1:
            batch.rows.pop()  # a free slot: the zeroed embedding (and every op of a full step)
        rows = len(batch.rows)
        mx.eval(mx.argmax(batch.forward(mx.zeros((rows,), mx.uint32)), axis=-1))
    mx.clear_cache()
    return seconds_per_token

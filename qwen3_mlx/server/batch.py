"""The rows of a running batch: each request's prefill state, then its place in the model's
`BatchKVCache`, and the decode step queued on the device but not yet read."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..generation import Sampled, SamplingStep
from .jobs import GenerationRequest
from .models import LoadedModel
from .prefix import copy_prefix


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
        self.first_token_at: float | None = None


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
    caches get). A second row turns them into one `BatchKVCache` (left-padded rows); when one
    row is left it gets plain caches back. Each switch copies the KV cache once.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.rows: list[Row] = []
        self.cache: list[KVCache] | list[BatchKVCache] | None = None
        self.step: SamplingStep | None = None
        self.queued: Queued | None = None

    @property
    def batched(self) -> bool:
        return self.cache is not None and isinstance(self.cache[0], BatchKVCache)

    def add(self, row: Row) -> None:
        if self.cache is None:
            self.cache = row.cache
        else:
            if not self.batched:
                self.cache = [BatchKVCache.merge([c]) for c in self.cache]
            for mine, theirs in zip(self.cache, row.cache, strict=True):
                mine.extend(BatchKVCache.merge([theirs]))
        row.cache = None
        self.rows.append(row)
        self.step = None

    def extract(self, index: int, length: int) -> list[KVCache]:
        """Row `index`'s first `length` cached tokens, as plain caches of their own."""
        if not self.batched:
            return [copy_prefix(c, length) for c in self.cache]
        return [copy_prefix(c.extract(index), length) for c in self.cache]

    def keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache, self.queued = None, None
        elif self.batched and len(self.rows) == 1:
            self.cache = [c.extract(indices[0]) for c in self.cache]
        elif self.batched:
            for c in self.cache:
                c.filter(indices)
        self.step = None

"""The engine's side of models loaded and unloaded while it runs (loader.py decides when).

Both run on the engine thread (through `Engine.call`), between two turns of its loop, so no step
ever sees a model half added or half gone: a new model is warmed up here (its compiles trace on
the thread that runs its steps; the other models' requests pause meanwhile, as long as the
warm-up takes) and gets its batch and prefix store; a removed one loses them, and MLX's cache of
freed buffers is emptied, so that its memory goes back at once.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx

from .batch import Batch, warm_up
from .models import LoadedModel
from .prefix import PrefixStore

log = logging.getLogger("qwen3_mlx.server")


class Residency:
    """Mixed into `Engine`, which provides `models`, `_batches`, `_prefixes`, `_waiting`,
    `_prefilling`, `warmup`, `rehearse`, `max_concurrency`, `prefill_step`, the prefix store's sizes,
    `_fail` and `_finish_cancelled`."""

    def add_model(self, loaded: LoadedModel) -> None:
        """Serve `loaded` (engine thread). Its weights were evaluated where they were read."""
        if loaded.kind == "llm" and self.warmup:
            started = time.perf_counter()
            try:
                rate = warm_up(loaded, self.max_concurrency, self.prefill_step)
                self._prefill_seconds_per_token = max(self._prefill_seconds_per_token, rate)
            except Exception as e:  # a slower first request, not a reason to refuse the model
                log.warning("warm-up of %s failed: %s: %s", loaded.id, type(e).__name__, e)
            log.info("warm-up of %s: %.1f s", loaded.id, time.perf_counter() - started)
        self._prefixes[loaded.id] = PrefixStore(self.prefix_cache_entries, self.prefix_cache_bytes)
        if loaded.kind == "llm":
            self._batches[loaded.id] = Batch(loaded)
            if self.rehearse:
                try:
                    self._rehearse(loaded, self.max_concurrency)
                except Exception as e:  # as for the warm-up: a slower first request
                    log.warning("rehearsal of %s failed: %s: %s", loaded.id, type(e).__name__, e)
        self.models = [*self.models, loaded]

    def remove_model(self, model_id: str) -> None:
        """Stop serving a model (engine thread). The loader unloads only models no request holds,
        so what is left of its requests here belongs to clients that left (their cancellation
        is taken in this turn's `_admit`, just before): they end as cancelled. Any other would
        be a bug, and fails alone. (A waiting one, marked cancelled, leaves in the next turn's
        `_admit`, which gives its queue place back.)"""
        batch = self._batches.pop(model_id, None)
        rows = list(batch.rows) if batch is not None else []
        rows += [r for r in self._prefilling if r.request.model.id == model_id]
        self._prefilling = [r for r in self._prefilling if r.request.model.id != model_id]
        for row in rows:
            if row.request.cancelled or row.request.cancel_requested:
                self._finish_cancelled(row.request, row)
            else:
                self._fail(row.request, RuntimeError(f"model {model_id!r} was unloaded"), "unload")
        for request in self._waiting:
            if request.model.id == model_id:
                if not (request.cancelled or request.cancel_requested):
                    log.error(
                        "request %s waits for model %s, which is unloaded", request.id, model_id
                    )
                request.cancelled = True
        self._prefixes.pop(model_id, None)
        self.models = [m for m in self.models if m.id != model_id]
        mx.clear_cache()

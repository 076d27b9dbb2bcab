"""Prefill's peak memory: no more than mlx-lm's on the same weights (CPU backend)."""

from __future__ import annotations

import gc

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from benchmarks import models as bench_models


def _prefill_peak(model, tokens: mx.array) -> int:
    """Bytes allocated at the peak of one prefill, over what was live before it."""
    gc.collect()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    logits = model(tokens, cache=make_prompt_cache(model))
    mx.eval(logits)
    peak = mx.get_peak_memory() - before
    del logits
    return peak


def test_prefill_peak_memory_not_above_mlx_lm(monkeypatch):
    config = dict(
        bench_models.PRESETS["qwen3-0.6b"], num_hidden_layers=3, vocab_size=2048,
        hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64,
    )  # fmt: skip
    monkeypatch.setitem(bench_models.PRESETS, "memory-test", config)
    models, weights = bench_models.build(
        "memory-test", 4, 64, impls=("ours", "mlx-lm"), dtype=mx.float32
    )
    del weights  # the models share these arrays; the dict would keep replaced ones alive
    tokens = mx.random.randint(0, 2048, (1, 192))
    for model in models.values():  # build fused projections / caches outside the measurement
        mx.eval(model(tokens[:, :2]))
    ours = _prefill_peak(models["ours"], tokens)
    theirs = _prefill_peak(models["mlx-lm"], tokens)
    assert ours <= 1.05 * theirs, (ours / 1e6, theirs / 1e6)

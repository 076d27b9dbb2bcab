"""The CPU backend's decode step (decode_steps.CpuDecode) against the general path.

Same logits as `compile=0` (uncompiled reference ops) for dense and MoE models,
float32 and bfloat16, 4- and 8-bit, batch 1 and 2, across a growth of the KV cache; its
transposed copy of the keys stays right when the cache is trimmed and refilled, or written
outside the model; caches it does not handle (quantized) keep the general step.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import qwen3_mlx.model as model_module
from benchmarks.models import PRESETS, random_weights, skeleton

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the CPU backend's decode step"
)


def tiny_model(dtype=mx.float32, bits=4, group_size=64, dense=False, tied=False):
    """The benchmarks' tiny preset (MoE: 16 experts, top-4; GQA 4:2) in 2 layers."""
    config = dict(PRESETS["tiny"], num_hidden_layers=2, vocab_size=512, tie_word_embeddings=tied)
    if dense:
        config.update(model_type="qwen3", num_experts=0, intermediate_size=512)
    model = skeleton("ours", config, bits, group_size)
    model.update(tree_unflatten(list(random_weights(model, dtype=dtype).items())))
    model.eval()
    return model, config


def decode_logits(model, tokens: np.ndarray, prompt: int, compile: str, cache=None):
    """Logits of a prefill up to `prompt` tokens (after what `cache` holds), then one decode
    step per remaining token, with the compile switch set to `compile` (the same kernels; a
    change forgets the compiled steps, as a switch set at load would never have built them)."""
    if model.model.compile_mode != compile:
        model.use_kernels(model.kernel_plan, compile=compile)
    cache = cache or [KVCache() for _ in model.layers]
    outs = [model(mx.array(tokens[:, cache[0].offset : prompt]), cache)[:, -1:]]
    for i in range(prompt, tokens.shape[1]):
        outs.append(model(mx.array(tokens[:, i : i + 1]), cache))
    return np.concatenate([np.array(o.astype(mx.float32)) for o in outs], axis=1)


def cpu_step_built(model) -> bool:
    """Whether the body holds a CpuDecode (built by the last decode steps since use_kernels)."""
    return "_compiled_cpu" in model.model.__dict__


def count_cpu_steps(monkeypatch) -> list:
    calls = []
    original = model_module.CpuDecode.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(model_module.CpuDecode, "__call__", counted)
    return calls


CASES = [
    pytest.param(dict(), 2, id="moe-4bit-b2"),
    pytest.param(dict(), 1, id="moe-4bit-b1"),
    pytest.param(dict(bits=8, group_size=32, tied=True), 2, id="moe-8bit-tied-b2"),
    pytest.param(dict(dense=True), 2, id="dense-4bit-b2"),
    pytest.param(dict(dtype=mx.bfloat16), 2, id="moe-bf16-b2"),
]


@pytest.mark.parametrize("kwargs, batch", CASES)
def test_cpu_step_matches_the_general_path(kwargs, batch, monkeypatch):
    model, _ = tiny_model(**kwargs)
    # 250 prefilled + 10 decoded: the cache grows past its first 256 positions mid-decode.
    tokens = np.random.default_rng(0).integers(0, 512, (batch, 260))
    calls = count_cpu_steps(monkeypatch)
    fast = decode_logits(model, tokens, 250, compile="1")
    assert cpu_step_built(model) and len(calls) == 10  # every decode step took CpuDecode
    plain = decode_logits(model, tokens, 250, compile="0")
    assert not cpu_step_built(model) and len(calls) == 10  # none did
    # The same arithmetic (bitwise equal here); fused kernels may contract to FMA elsewhere.
    tolerance = 0.25 if "dtype" in kwargs else 1e-5
    np.testing.assert_allclose(fast, plain, atol=tolerance, rtol=tolerance)
    # Greedy decoding picks the same tokens.
    assert (fast.argmax(-1) == plain.argmax(-1)).mean() > 0.9


def test_transposed_keys_follow_trim_and_refill(monkeypatch):
    """Trim 3 positions and refill 3 other tokens: same offset as before, other keys. The CPU
    step's copy of the keys must not be reused (the model drops it on the refill)."""
    model, _ = tiny_model()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 512, (1, 24))
    cache = [KVCache() for _ in model.layers]
    decode_logits(model, tokens[:, :20], 12, compile="1", cache=cache)
    for c in cache:
        c.trim(3)
    other = rng.integers(0, 512, (1, 7))
    refill = np.concatenate([tokens[:, :17], other], axis=1)  # 3 refilled + 4 decoded
    got = decode_logits(model, refill, 20, compile="1", cache=cache)
    want = decode_logits(model, refill, 20, compile="0")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # A one-token refill goes through the CPU step itself: trimmed, its copy is rebuilt.
    for c in cache:
        c.trim(2)
    again = np.concatenate([refill[:, :22], other[:, :2] + 1], axis=1)
    calls = count_cpu_steps(monkeypatch)
    got = decode_logits(model, again, 23, compile="1", cache=cache)
    assert len(calls) == 2  # the refill and the one decoded token
    want = decode_logits(model, again, 23, compile="0")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_transposed_keys_follow_writes_outside_the_model(monkeypatch):
    """Positions appended to the caches directly (not through the model) are seen."""
    model, _ = tiny_model()
    tokens = np.random.default_rng(3).integers(0, 512, (1, 18))
    cache = [KVCache() for _ in model.layers]
    decode_logits(model, tokens[:, :12], 8, compile="1", cache=cache)
    reference = []
    for c in cache:
        twin = KVCache()
        twin.state = c.state
        reference.append(twin)
    attn = model.layers[0].self_attn
    for c, twin in zip(cache, reference, strict=True):
        kv = mx.random.normal((2, 1, attn.n_kv_heads, 2, attn.head_dim))
        c.update_and_fetch(kv[0], kv[1])
        twin.update_and_fetch(kv[0], kv[1])
    extended = np.concatenate([tokens[:, :14], tokens[:, 12:]], axis=1)  # offset is now 14
    calls = count_cpu_steps(monkeypatch)
    got = decode_logits(model, extended, 15, compile="1", cache=cache)
    assert len(calls) == 6  # the one-token prefill and five decoded tokens
    want = decode_logits(model, extended, 15, compile="0", cache=reference)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_quantized_cache_keeps_the_general_step(monkeypatch):
    model, _ = tiny_model()
    tokens = np.random.default_rng(2).integers(0, 512, (1, 12))
    calls = count_cpu_steps(monkeypatch)
    cache = [QuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    decode_logits(model, tokens, 8, compile="1", cache=cache)
    assert calls == [] and not cpu_step_built(model)

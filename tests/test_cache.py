"""KV caches: kinds and shapes, quantized / rotating output, prefix reuse, prompt-cache files,
and the long-context (YaRN) switch."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from qwen3_mlx.cache import (
    PromptCache,
    common_prefix_length,
    enable_long_context,
    load_prompt_cache,
    make_cache,
    save_prompt_cache,
)
from qwen3_mlx.errors import GenerationError
from qwen3_mlx.generate import forward, generate, prepare_prompt

MESSAGES = [{"role": "user", "content": "Tell me about caches"}]


def test_make_cache_kinds_and_errors(tiny_qwen3):
    model, _ = tiny_qwen3
    assert all(type(c) is KVCache for c in make_cache(model))
    quantized = make_cache(model, kv_bits=4, kv_group_size=32)
    assert all(
        isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (4, 32) for c in quantized
    )
    rotating = make_cache(model, max_kv_size=64)
    assert all(isinstance(c, RotatingKVCache) and (c.max_size, c.keep) == (64, 4) for c in rotating)
    assert len(rotating) == len(model.layers)
    with pytest.raises(GenerationError, match="^kv_bits"):
        make_cache(model, kv_bits=7)
    with pytest.raises(GenerationError, match="^kv_group_size"):
        make_cache(model, kv_bits=8, kv_group_size=64)  # head_dim is 32
    with pytest.raises(GenerationError, match="^kv_bits"):
        make_cache(model, kv_bits=8, kv_group_size=32, max_kv_size=64)
    with pytest.raises(GenerationError, match="^max_kv_size"):
        make_cache(model, max_kv_size=2)


def teacher_forced_logits(model, prompt, continuation, cache):
    """Logits after the prompt and after each continuation token, fed one by one."""
    steps = [forward(model, mx.array([prompt]), cache)]
    steps += [forward(model, mx.array([[t]]), cache) for t in continuation]
    return np.concatenate([np.array(s) for s in steps])


@pytest.mark.parametrize("bits, tolerance", [(8, 0.1), (4, 1.0)])
def test_quantized_cache_stays_close(tiny_qwen3, bits, tolerance):
    model, tok = tiny_qwen3
    plain = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=10)
    prompt = prepare_prompt(tok, messages=MESSAGES).tokens
    ref = teacher_forced_logits(model, prompt, plain.tokens, make_cache(model))
    quant_cache = make_cache(model, kv_bits=bits, kv_group_size=32)
    quant = teacher_forced_logits(model, prompt, plain.tokens, quant_cache)
    error = np.abs(quant - ref).max()
    assert error < tolerance
    # Greedy picks agree wherever the reference's best token leads by more than the error.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * error
    assert np.array_equal(ref.argmax(-1)[clear], quant.argmax(-1)[clear])

    keys = quant_cache[0].keys  # (packed uint32, scales, biases)
    positions = len(prompt) + len(plain.tokens)
    assert quant_cache[0].offset == positions
    assert keys[0].shape[:2] == (1, 1) and keys[0].shape[2] >= positions
    assert keys[0].shape[-1] == 32 * bits // 32 and keys[1].shape[-1] == 32 // 32

    # And through generate: a full run on a quantized PromptCache.
    cache = PromptCache(make_cache(model, kv_bits=bits, kv_group_size=32))
    out = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=10, cache=cache)
    assert len(out.tokens) == 10 and all(0 <= t < 151936 for t in out.tokens)
    assert len(cache.tokens) == cache.layers[0].offset == len(prompt) + 9  # the last isn't fed


def test_rotating_cache_is_bounded_and_sane(tiny_qwen3):
    model, tok = tiny_qwen3
    prompt_len = len(prepare_prompt(tok, messages=MESSAGES).tokens)
    # Within the window it is an ordinary cache: same tokens as unbounded.
    plain = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=8)
    window = generate(
        model, tok, messages=MESSAGES, temperature=0, max_tokens=8, max_kv_size=prompt_len + 16
    )
    assert window.tokens == plain.tokens
    # Past the window it keeps sliding (no context limit) and holds max_kv_size positions.
    cache = PromptCache(make_cache(model, max_kv_size=16))
    long = generate(model, tok, messages=MESSAGES, temperature=0, max_tokens=40, cache=cache)
    assert len(long.tokens) == 40 and long.finish_reason == "length"
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 16, 32) and layer.offset == prompt_len + 39


def test_prompt_cache_reuse_trims_to_the_common_prefix(tiny_qwen3):
    model, tok = tiny_qwen3
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    cache = PromptCache(make_cache(model))
    first = generate(
        model, tok, prompt=list(range(100, 120)), temperature=0, max_tokens=5, cache=cache
    )
    assert first.stats.cached_tokens == 0 and len(cache.tokens) == 24
    # A prompt that shares 10 tokens: the cache is trimmed to 10 and 5 are prefilled.
    prompt = list(range(100, 110)) + [7, 8, 9, 10, 11]
    again = generate(model, tok, prompt=prompt, temperature=0, max_tokens=5, cache=cache)
    assert (again.stats.cached_tokens, again.stats.prefill_tokens) == (10, 5)
    fresh = generate(model, tok, prompt=prompt, temperature=0, max_tokens=5)
    assert again.tokens == fresh.tokens  # the trimmed cache is exactly the shorter prefix
    # The same prompt again: everything but the last token is reused.
    same = generate(model, tok, prompt=prompt, temperature=0, max_tokens=5, cache=cache)
    assert (same.stats.cached_tokens, same.tokens) == (14, fresh.tokens)


def test_wrapped_rotating_cache_starts_afresh(tiny_qwen3):
    model, tok = tiny_qwen3
    cache = PromptCache(make_cache(model, max_kv_size=8))
    generate(model, tok, prompt=list(range(100, 120)), temperature=0, max_tokens=3, cache=cache)
    out = generate(
        model, tok, prompt=list(range(100, 121)), temperature=0, max_tokens=3, cache=cache
    )
    assert out.stats.cached_tokens == 0 and out.stats.prefill_tokens == 21


def test_prompt_cache_file_round_trip(tiny_qwen3, tmp_path):
    model, tok = tiny_qwen3
    system = [{"role": "system", "content": "You are a cache test. " * 5}]
    cache = PromptCache(make_cache(model))
    prefix = prepare_prompt(tok, messages=system + MESSAGES).tokens
    generate(model, tok, prompt=prefix, temperature=0, max_tokens=1, cache=cache)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, model_id="tiny", note="test")

    loaded = load_prompt_cache(path, model=model, model_id="tiny")
    assert loaded.tokens == cache.tokens and loaded.metadata["note"] == "test"
    assert loaded.layers[0].offset == len(cache.tokens)
    follow_up = system + MESSAGES + [{"role": "assistant", "content": "ok"}] + MESSAGES
    from_file = generate(model, tok, messages=follow_up, temperature=0, max_tokens=6, cache=loaded)
    fresh = generate(model, tok, messages=follow_up, temperature=0, max_tokens=6)
    assert from_file.tokens == fresh.tokens
    assert from_file.stats.cached_tokens > len(tok.encode("You are a cache test. " * 5))

    with pytest.raises(GenerationError, match="made for model 'tiny'"):
        load_prompt_cache(path, model_id="other")
    with pytest.raises(GenerationError, match="no such prompt cache"):
        load_prompt_cache(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(GenerationError, match="not a prompt cache"):
        load_prompt_cache(tmp_path / "junk.safetensors")
    with pytest.raises(GenerationError, match="empty"):
        save_prompt_cache(tmp_path / "empty.safetensors", PromptCache(make_cache(model)))


def test_long_context_switch(tiny_qwen3_dir):
    from qwen3_mlx.loading import load_model

    config = json.loads((tiny_qwen3_dir / "config.json").read_text())
    long = enable_long_context(config)
    assert long["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert long["max_position_embeddings"] == 131072 and "rope_scaling" not in config
    assert enable_long_context(long) == long  # already scaled: unchanged

    model, loaded_config = load_model(tiny_qwen3_dir, long_context=True)
    rope = model.layers[0].self_attn.rope
    assert rope._periods is not None and rope.attention_scale > 1.0
    assert model.args.max_position_embeddings == 131072
    plain, _ = load_model(tiny_qwen3_dir)
    assert plain.layers[0].self_attn.rope._periods is None

"""`loading.prepare_for_inference`: on MLX's CPU backend a quantized half-precision output head is
swapped for its dense copy (quantized matmuls with bf16/fp16 scales are 7-10x slower there).

The generation API (`load`), the CLIs, the server and `distributed.load` all go through it, so
the logits must agree with the quantized path, the tied embedding's lookups must not change, and
heads where it gains nothing (float32 scales, too large, not quantized) must be left alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from qwen3_mlx import loading
from qwen3_mlx.loading import load_model, prepare_for_inference

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu, reason="the swap happens on the CPU backend only"
)


def quantized(path, dtype=mx.bfloat16):
    model, _ = load_model(path)
    model.set_dtype(dtype)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def head_of(model):
    return model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_tied_head_is_made_dense_and_agrees_with_the_quantized_one(tiny_qwen3_dir, dtype):
    model = quantized(tiny_qwen3_dir, dtype)
    hidden = mx.random.normal((3, model.args.hidden_size), key=mx.random.key(0)).astype(dtype)
    tokens = mx.array([[0, 11, 151935, 42]])
    want_logits = model.logits(hidden).astype(mx.float32)
    want_embedding = model.model.embed_tokens(tokens)
    want_forward = model(tokens)

    assert prepare_for_inference(model) is model
    assert isinstance(head_of(model), nn.Embedding) and not hasattr(head_of(model), "scales")
    assert head_of(model).weight.dtype == dtype
    got = model.logits(hidden).astype(mx.float32)
    scale = mx.abs(want_logits).max().item()
    assert mx.abs(got - want_logits).max().item() < 0.02 * scale
    assert (mx.argmax(got, axis=-1) == mx.argmax(want_logits, axis=-1)).all().item()
    assert mx.array_equal(model.model.embed_tokens(tokens), want_embedding).item()
    assert (
        mx.abs(model(tokens) - want_forward).max().item() < 0.02 * mx.abs(want_forward).max().item()
    )


def test_untied_lm_head_is_made_dense(tmp_path):
    from tests.conftest import write_tiny_qwen3

    path = write_tiny_qwen3(tmp_path / "untied", tie_word_embeddings=False, vocab_size=4096)
    model = quantized(path)
    hidden = mx.random.normal((2, model.args.hidden_size), key=mx.random.key(1)).astype(mx.bfloat16)
    want = model.logits(hidden).astype(mx.float32)
    prepare_for_inference(model)
    assert type(model.lm_head) is nn.Linear
    assert hasattr(model.model.embed_tokens, "scales")  # the input embedding stays quantized
    got = model.logits(hidden).astype(mx.float32)
    assert mx.abs(got - want).max().item() < 0.02 * mx.abs(want).max().item()


def test_heads_it_would_not_speed_up_are_left_alone(tiny_qwen3_dir, monkeypatch):
    # float32 scales: CPU quantized matmul is as fast as dense there.
    model = quantized(tiny_qwen3_dir, mx.float32)
    prepare_for_inference(model)
    assert hasattr(head_of(model), "scales")
    # Not quantized at all.
    plain, _ = load_model(tiny_qwen3_dir)
    before = head_of(plain)
    prepare_for_inference(plain)
    assert head_of(plain) is before
    # Larger than the limit.
    monkeypatch.setattr(loading, "DENSE_HEAD_MAX_BYTES", 1 << 20)
    big = quantized(tiny_qwen3_dir)
    prepare_for_inference(big)
    assert hasattr(head_of(big), "scales")


def test_load_and_the_server_use_it(tmp_path, tiny_qwen3_dir):
    """`qwen3_mlx.load` and the server's loader hand out prepared models."""
    import shutil

    from mlx.utils import tree_flatten

    from qwen3_mlx.server.models import load_served_model

    model = quantized(tiny_qwen3_dir)
    out = tmp_path / "q4"
    shutil.copytree(tiny_qwen3_dir, out)
    (out / "model.safetensors").unlink()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    import json

    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))

    assert hasattr(head_of(load_model(out)[0]), "scales")  # the raw loader keeps the checkpoint
    assert not hasattr(head_of(loading.load(out)[0]), "scales")
    assert not hasattr(head_of(load_served_model(str(out)).model), "scales")

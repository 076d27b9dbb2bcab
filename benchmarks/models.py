"""Random-weight models of the real Qwen3 shapes, built directly in quantized form.

No download and no full-precision copy of the model: both projects' modules are created
lazily, quantized structurally (nothing is computed), then handed the same dict of random
packed weights, scales and biases, generated tensor by tensor on the device. Parameter names
are identical in qwen3_mlx and mlx-lm, so one dict loads into both.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

_COMMON = dict(
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    vocab_size=151936,
    head_dim=128,
)

PRESETS: dict[str, dict] = {
    # Small enough for the CPU backend; MoE so the expert path is exercised.
    "tiny": dict(
        _COMMON,
        model_type="qwen3_moe",
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=4096,
        tie_word_embeddings=False,
    ),
    "qwen3-0.6b": dict(
        _COMMON,
        model_type="qwen3",
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _COMMON,
        model_type="qwen3",
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
    "qwen3-32b": dict(
        _COMMON,
        model_type="qwen3",
        hidden_size=5120,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=25600,
        tie_word_embeddings=False,
    ),
    # A dense draft small enough for a CPU run (the real vocabulary, so any target takes it).
    "draft-tiny": dict(
        _COMMON,
        model_type="qwen3",
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        tie_word_embeddings=True,
    ),
    "qwen3-30b-a3b": dict(
        _COMMON,
        model_type="qwen3_moe",
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    ),
    # One layer of the 235B model (94 in the real one): per-layer kernels at full width.
    "qwen3-235b-a22b-1layer": dict(
        _COMMON,
        model_type="qwen3_moe",
        hidden_size=4096,
        num_hidden_layers=1,
        num_attention_heads=64,
        num_key_value_heads=4,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    ),
}


def _router_predicate(bits: int, group_size: int):
    """mlx-lm's recipe: everything at `bits`, the MoE router at 8 bits."""

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if path.endswith("mlp.gate"):
            return {"group_size": 64, "bits": 8}
        return {"group_size": group_size, "bits": bits}

    return predicate


def skeleton(impl: str, config: dict, bits: int, group_size: int) -> nn.Module:
    """The model's modules, quantized structurally; their (lazy) weights are never computed."""
    if impl == "ours":
        from qwen3_mlx.config import ModelArgs
        from qwen3_mlx.model import Model

        model = Model(ModelArgs.from_dict(dict(config)))
    else:
        import importlib

        module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model = module.Model(module.ModelArgs.from_dict(dict(config)))
    if bits < 16:
        nn.quantize(model, group_size, bits, class_predicate=_router_predicate(bits, group_size))
    return model


def _random_words(shape) -> mx.array:
    """Uniform random uint32 (two exact 16-bit draws: randint goes through float32)."""
    hi = mx.random.randint(0, 1 << 16, shape).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, shape).astype(mx.uint32)
    return (hi << 16) | lo


def random_weights(model: nn.Module, seed: int = 0, dtype=mx.bfloat16) -> dict[str, mx.array]:
    """Random parameters with the model's names and shapes (quantized: packed ints + scales).

    Weights dequantize to roughly uniform values of std 1/sqrt(fan_in), so activations keep a
    sane scale through depth and the router sees varied logits (realistic expert spread).
    """
    mx.random.seed(seed)
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {}
    pending = 0
    for name, like in params.items():
        prefix, _, leaf = name.rpartition(".")
        module = modules.get(prefix)
        bits = getattr(module, "bits", None)
        if like.dtype == mx.uint32:
            value = _random_words(like.shape)
        elif leaf == "scales":
            fan_in = like.shape[-1] * module.group_size
            q_std = (2**bits) / math.sqrt(12)
            base = 1.0 / (math.sqrt(fan_in) * q_std)
            value = (base * mx.random.uniform(0.5, 1.5, like.shape)).astype(dtype)
        elif leaf == "biases":
            scales = out[f"{prefix}.scales"]
            value = (-scales.astype(mx.float32) * ((2**bits - 1) / 2)).astype(dtype)
        elif like.ndim == 1:  # norms
            value = (1.0 + 0.1 * mx.random.normal(like.shape)).astype(dtype)
        else:
            value = (mx.random.normal(like.shape) / math.sqrt(like.shape[-1])).astype(dtype)
        out[name] = value
        pending += value.nbytes
        if pending > 1 << 30:  # bound temporaries: materialise ~1 GB at a time
            mx.eval(out)
            pending = 0
    mx.eval(out)
    return out


def build(
    preset: str,
    bits: int,
    group_size: int,
    impls=("ours", "mlx-lm"),
    seed: int = 0,
    dtype=mx.bfloat16,
):
    """{impl: model} sharing one set of random weights, and that weight dict."""
    config = PRESETS[preset]
    models = {impl: skeleton(impl, config, bits, group_size) for impl in impls}
    weights = random_weights(next(iter(models.values())), seed, dtype=dtype)
    for impl, model in models.items():
        names = {k for k, _ in tree_flatten(model.parameters())}
        if names != set(weights):
            missing, extra = names - set(weights), set(weights) - names
            raise RuntimeError(f"{impl}: parameter names differ: {sorted(missing | extra)[:8]}")
        model.update(tree_unflatten(list(weights.items())))
        model.eval()
    return models, weights

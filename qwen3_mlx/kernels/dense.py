"""Dense layers through the kernels: the quantized linear (o_proj + residual, the lm_head for a
few tokens), a dense SwiGLU MLP as one "expert" of the MoE kernels, and residual add + RMSNorm.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from . import tuning
from .attention import attention_site
from .build import affine_params, dummy, float_bits, quant_ok, run, tickets
from .moe import gate_up, gate_up_rows_fit


class OneExpert:
    """A quantized linear layer's arrays viewed as a stack of one expert (built once).

    The views are made and evaluated here, not per call: inside a compiled step each would
    otherwise be one more primitive to dispatch per token.
    """

    def __init__(self, layer):
        w, s, b, self.group_size, self.bits = affine_params(layer)
        self.params = (w[None], s[None], b[None])
        mx.eval(self.params)
        self.source = layer["weight"]

    @classmethod
    def of(cls, layer) -> OneExpert:
        cached = layer.__dict__.get("_one_expert")
        if cached is None or cached.source is not layer["weight"]:
            cached = cls(layer)
            object.__setattr__(layer, "_one_expert", cached)
        return cached


@functools.cache
def _routing_to_one() -> tuple[mx.array, mx.array]:
    """Every token to expert 0 with weight 1 (dense layers through the MoE kernels).

    Sized for the most tokens a kernel covers; the kernels read only the rows they need.
    """
    arrays = (
        mx.zeros((tuning.MAX_DECODE_TOKENS, 1), mx.uint32),
        mx.ones((tuning.MAX_DECODE_TOKENS, 1), mx.float32),
    )
    mx.eval(arrays)
    return arrays


def prepare(model) -> None:
    """Build, outside any compile trace, the constant views the dense kernels use and the
    split kernels' arrival counters."""
    for dtype in tuning.FLOAT_TYPES:
        dummy(dtype)
    _routing_to_one()
    for layer in model.layers:
        tickets(layer.self_attn)
        tickets(layer.self_attn, attention_site())
        layers = []
        mlp = layer.mlp
        if hasattr(mlp, "gate"):
            tickets(mlp.gate)
        if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj")):
            if not hasattr(mlp, "switch_mlp"):
                layers += [mlp.gate_proj, mlp.up_proj]
        for projection in layers:
            if affine_params(projection) is not None:
                OneExpert.of(projection)


def linear(
    x: mx.array,
    params,
    out_shape,
    residual: mx.array | None = None,
    tokens_per_pass: int | None = None,
) -> mx.array:
    """(residual +) x W^T for affine-quantized (w, scales, biases, group_size, bits), one launch.

    x may be any contiguous array of `tokens` rows of the layer's input (for example the
    attention output still in (B, heads, 1, head_dim) layout); the result has `out_shape`.
    Up to `tokens_per_pass` (default tuning.LINEAR_TOKENS) tokens share each read of the weights.
    """
    w, scales, biases, group_size, bits = params
    out_dims, in_dims = w.shape[0], w.shape[1] * 32 // bits
    tokens = x.size // in_dims
    per_group = min(tokens, tokens_per_pass or tuning.LINEAR_TOKENS)
    has_res = residual is not None
    (y,) = run(
        "linear",
        inputs=[x, w, scales, biases, residual if has_res else dummy(x.dtype)],
        template=[
            ("T", x.dtype),
            ("S", scales.dtype),
            ("K", in_dims),
            ("N", out_dims),
            ("M", tokens),
            ("GS", group_size),
            ("BITS", bits),
            ("MT", per_group),
            ("NW", tuning.LINEAR_WARPS),
            ("RPW", tuning.LINEAR_ROWS),
            ("HAS_RES", has_res),
        ],
        grid=(
            out_dims // (tuning.LINEAR_WARPS * tuning.LINEAR_ROWS) * tuning.LINEAR_WARPS * 32,
            -(-tokens // per_group),
            1,
        ),
        threadgroup=(tuning.LINEAR_WARPS * 32, 1, 1),
        output_shapes=[tuple(out_shape)],
        output_dtypes=[x.dtype],
    )
    return y


def _linear_ok(layer, x: mx.array) -> bool:
    params = affine_params(layer)
    if params is None:
        return False
    out_dims, in_dims = layer["weight"].shape[0], layer["weight"].shape[-1] * 32 // layer.bits
    return (
        quant_ok(params, in_dims)
        and x.dtype in tuning.FLOAT_TYPES
        and x.size % in_dims == 0
        and out_dims % (tuning.LINEAR_WARPS * tuning.LINEAR_ROWS) == 0
        and x.size // in_dims <= tuning.MAX_DECODE_TOKENS
    )


def linear_residual(layer, x: mx.array, residual: mx.array) -> mx.array:
    """residual + layer(x) for an affine-quantized, bias-free linear layer, one launch."""
    return linear(x, affine_params(layer), residual.shape, residual)


def linear_residual_covered(layer, x: mx.array, residual: mx.array) -> bool:
    # Exactly QuantizedLinear: a sharded layer (mx.distributed) must keep its own all-reduce.
    tokens = residual.size // residual.shape[-1]
    return (
        type(layer) is nn.QuantizedLinear
        and _linear_ok(layer, x)
        and residual.dtype == x.dtype
        and tokens == x.size // (layer["weight"].shape[-1] * 32 // layer.bits)
        and tokens <= tuning.LINEAR_MAX_TOKENS
    )


def logits_covered(head, hidden: mx.array) -> bool:
    """The output projection (lm_head, or tied quantized embeddings) for 2-32 tokens.
    One token stays on MLX's quantized matrix-vector kernel."""
    tokens = hidden.size // hidden.shape[-1]
    return (
        type(head) in (nn.QuantizedLinear, nn.QuantizedEmbedding)
        and 2 <= tokens <= tuning.LOGITS_MAX_TOKENS
        and _linear_ok(head, hidden)
    )


def logits(head, hidden: mx.array) -> mx.array:
    out_shape = (*hidden.shape[:-1], head["weight"].shape[0])
    return linear(hidden, affine_params(head), out_shape, tokens_per_pass=tuning.LOGITS_TOKENS)


def mlp_covered(mlp, x: mx.array) -> bool:
    gate, up, down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if any(type(p) is not nn.QuantizedLinear for p in (gate, up, down_proj)):
        return False  # e.g. tensor-parallel shards: they communicate in their own call
    params = [affine_params(p) for p in (gate, up, down_proj)]
    if any(p is None for p in params):
        return False
    hidden = gate["weight"].shape[0]
    return (
        quant_ok(params[0], x.shape[-1])
        and params[0][3:] == params[1][3:]
        and quant_ok(params[2], hidden)
        and gate_up_rows_fit(hidden)
        and x.shape[-1] % (tuning.DOWN_WARPS * tuning.DOWN_ROWS) == 0
        and x.dtype in tuning.FLOAT_TYPES
        and x.size // x.shape[-1] <= tuning.MAX_DECODE_TOKENS
    )


def dense_mlp(mlp, x: mx.array, residual: mx.array | None = None) -> mx.array:
    """(residual +) down(silu(gate(x)) * up(x)) for a quantized SwiGLU MLP, two launches."""
    gate, up = OneExpert.of(mlp.gate_proj), OneExpert.of(mlp.up_proj)
    idx, _ = _routing_to_one()
    h = gate_up(x, idx, gate.params, up.params, gate.group_size, gate.bits)
    return linear(h, affine_params(mlp.down_proj), x.shape, residual)


def add_rms_norm_covered(x: mx.array) -> bool:
    return x.dtype in tuning.FLOAT_TYPES and x.shape[-1] % 32 == 0


def add_rms_norm(
    a: mx.array, b: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """(a + b, rms_norm(a + b) * weight) in one pass."""
    dims = a.shape[-1]
    threads = next(n for n in (256, 128, 64, 32) if dims % n == 0)
    rows = a.size // dims
    s, n = run(
        "add_rms_norm",
        inputs=[a.reshape(rows, dims), b.reshape(rows, dims), weight],
        template=[("T", a.dtype), ("D", dims), ("NT", threads), ("EPS_BITS", float_bits(eps))],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(rows, dims), (rows, dims)],
        output_dtypes=[a.dtype, a.dtype],
    )
    return s.reshape(a.shape), n.reshape(a.shape)

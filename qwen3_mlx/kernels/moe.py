"""The MoE kernels: router (gate logits, softmax, top k), gate+up+SwiGLU, down + weighted sum.

Kernels read raw row-major memory, so inputs are passed without reshapes and outputs are
created in their final shapes: every reshape/astype/view is one more primitive the host has
to dispatch per layer per token, and host work is what bounds decode speed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import tuning
from .build import affine_params, dummy, float_bits, quant_ok, run, split_count, tickets


def _router_shape(num_experts: int) -> tuple[int, int]:
    """(threadgroups per token, threads per threadgroup) of the router kernel."""
    split = split_count(tuning.ROUTER_SPLIT, lambda n: num_experts % n == 0)
    per_group = num_experts // split
    warps = [w for w in (8, 4, 2) if per_group % w == 0]  # <= 256 threads: registers
    warps = (
        [w for w in warps if per_group // w >= tuning.ROUTER_EXPERTS_PER_WARP] or warps[-1:] or [1]
    )
    return split, 32 * warps[0]


def router_covered(gate, x: mx.array, num_experts: int, top_k: int) -> bool:
    params = affine_params(gate)
    return (
        quant_ok(params, x.shape[-1])
        and x.dtype in tuning.FLOAT_TYPES
        and x.shape[-1] % 8 == 0
        and top_k <= min(num_experts, 32)
        and x.size // x.shape[-1] <= tuning.MAX_DECODE_TOKENS
    )


def gate_up_rows_fit(hidden: int) -> bool:
    """Whether gate+up's row tiles (one token's or a batch's) divide `hidden`."""
    return (
        hidden % (tuning.GATE_UP_WARPS * max(tuning.GATE_UP_ROWS, tuning.GATE_UP_ROWS_ONE_TOKEN))
        == 0
    )


def experts_covered(experts, x: mx.array, top_k: int) -> bool:
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    params = [affine_params(p) for p in (gate, up, down)]
    if any(p is None for p in params):
        return False
    num_experts, dims = params[0][0].shape[0], x.shape[-1]
    hidden = params[2][0].shape[-1] * 32 // params[2][4]
    tokens = x.size // x.shape[-1]
    return (
        x.dtype in tuning.FLOAT_TYPES
        and tokens <= tuning.MAX_DECODE_TOKENS
        and top_k <= num_experts
        and quant_ok(params[0], dims)
        and quant_ok(params[1], dims)
        and quant_ok(params[2], hidden)
        and params[0][3:] == params[1][3:]
        and gate_up_rows_fit(hidden)
        and dims % (tuning.DOWN_WARPS * tuning.DOWN_ROWS) == 0
    )


def moe_router(
    x: mx.array, gate, top_k: int, normalize: bool, norm: nn.RMSNorm | None = None
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Fused router → (indices uint32 (..., k) by falling probability, scores float32 (..., k),
    normalised x or None). With `norm`, x is un-normalised: the kernel applies the norm and
    returns norm(x), shaped as x, for the expert kernels."""
    w, scales, biases, group_size, bits = affine_params(gate)
    dims = x.shape[-1]
    tokens, num_experts = x.size // dims, w.shape[0]
    split, threads = _router_shape(num_experts)
    norm_w = norm.weight if norm is not None else dummy(x.dtype)
    shape = (*x.shape[:-1], top_k)
    indices, scores, x_norm, _ = run(
        "moe_router",
        inputs=[x, w, scales, biases, norm_w, tickets(gate)],
        template=[
            ("T", x.dtype),
            ("S", scales.dtype),
            ("E", num_experts),
            ("K", dims),
            ("GS", group_size),
            ("BITS", bits),
            ("TOPK", top_k),
            ("NORM", bool(normalize)),
            ("NORM_IN", norm is not None),
            ("EPS_BITS", float_bits(norm.eps if norm is not None else 0.0)),
            ("NT", threads),
            ("SPLIT", split),
        ],
        grid=(split * threads, tokens, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[
            shape,
            shape,
            x.shape if norm is not None else (1,),
            (tokens, num_experts),
        ],
        output_dtypes=[mx.uint32, mx.float32, x.dtype, mx.float32],
    )
    return indices, scores, x_norm if norm is not None else None


def moe_experts(
    experts,
    x: mx.array,
    indices: mx.array,
    scores: mx.array,
    residual: mx.array | None = None,
) -> mx.array:
    """Fused experts: (residual +) sum_j scores_j * down_j(silu(gate_j(x)) * up_j(x))."""
    wg, sg, bg, group_size, bits = affine_params(experts.gate_proj)
    wu, su, bu, _, _ = affine_params(experts.up_proj)
    h = gate_up(x, indices, (wg, sg, bg), (wu, su, bu), group_size, bits)
    return down(h, indices, scores, affine_params(experts.down_proj), x.shape, residual)


def gate_up(x, indices, gate_params, up_params, group_size, bits):
    """silu(x Wg_e^T) * (x Wu_e^T) for each (token, slot) pair → (pairs, hidden)."""
    wg, sg, bg = gate_params
    wu, su, bu = up_params
    num_experts, hidden = wg.shape[0], wg.shape[1]
    dims = x.shape[-1]
    top_k = indices.shape[-1]
    tokens = x.size // dims
    pairs = tokens * top_k
    single = tokens == 1
    rows = tuning.GATE_UP_ROWS_ONE_TOKEN if single else tuning.GATE_UP_ROWS
    (h,) = run(
        "moe_gate_up",
        inputs=[x, indices, wg, sg, bg, wu, su, bu],
        template=[
            ("T", x.dtype),
            ("S", sg.dtype),
            ("E", num_experts),
            ("K", dims),
            ("N", hidden),
            ("GS", group_size),
            ("BITS", bits),
            ("TOPK", top_k),
            ("P", pairs),
            ("NW", tuning.GATE_UP_WARPS),
            ("RPW", rows),
            ("PG", 1 if single else min(tuning.GATE_UP_PAIRS, pairs)),
            ("SINGLE_TOKEN", single),
        ],
        grid=(hidden // (tuning.GATE_UP_WARPS * rows) * tuning.GATE_UP_WARPS * 32, pairs, 1),
        threadgroup=(tuning.GATE_UP_WARPS * 32, 1, 1),
        output_shapes=[(pairs, hidden)],
        output_dtypes=[x.dtype],
    )
    return h


def down(h, indices, scores, params, out_shape, residual=None):
    """(residual +) sum_j scores_j * (h_j W_{e_j}^T) per token, returned in `out_shape`."""
    wd, sd, bd, group_size, bits = params
    hidden = wd.shape[-1] * 32 // bits
    dims = out_shape[-1]
    top_k = indices.shape[-1]
    tokens = h.size // (hidden * top_k)
    has_res = residual is not None
    dtype = h.dtype
    res = residual if has_res else dummy(dtype)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    (y,) = run(
        "moe_down",
        inputs=[h, indices, scores, wd, sd, bd, res],
        template=[
            ("T", dtype),
            ("S", sd.dtype),
            ("K", hidden),
            ("N", dims),
            ("GS", group_size),
            ("BITS", bits),
            ("TOPK", top_k),
            ("NW", tuning.DOWN_WARPS),
            ("RPW", tuning.DOWN_ROWS),
            ("HAS_RES", has_res),
        ],
        grid=(dims // (tuning.DOWN_WARPS * tuning.DOWN_ROWS) * tuning.DOWN_WARPS * 32, tokens, 1),
        threadgroup=(tuning.DOWN_WARPS * 32, 1, 1),
        output_shapes=[tuple(out_shape)],
        output_dtypes=[dtype],
    )
    return y

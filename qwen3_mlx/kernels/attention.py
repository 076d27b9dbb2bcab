"""Attention-side kernels: q/k RMSNorm + RoPE, the attention prologue (input norm + q/k/v
projection + q/k norms + RoPE in one launch), and split-K decode attention over the KV cache.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from . import tuning
from .build import backend, dummy, float_bits, run, split_count, tickets


def qk_norm_rope_covered(x: mx.array, head_dim: int) -> bool:
    return x.dtype in tuning.FLOAT_TYPES and head_dim % 64 == 0


def qk_norm_rope(
    q_src: tuple[mx.array, int],
    k_src: tuple[mx.array, int],
    v_src: tuple[mx.array, int],
    shape: tuple[int, int, int, int],
    q_weight: mx.array,
    k_weight: mx.array,
    inv_freq: mx.array,
    offset: mx.array,
    eps: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """RMSNorm of q and k heads, RoPE at positions offset + l, and the (B, H, L, D) layout.

    Each source is (array (B, L, C), column offset); q, k and v may share one fused array.
    shape = (n_heads, n_kv_heads, head_dim, batch); offset is int32 of size 1 or batch.
    """
    n_heads, n_kv_heads, head_dim, _ = shape
    q, q_off = q_src
    k, k_off = k_src
    v, v_off = v_src
    batch, seq = q.shape[0], q.shape[1]
    dtype = q.dtype
    warps = batch * seq * (n_heads + 2 * n_kv_heads)
    warps_per_group = tuning.ROPE_THREADS // 32
    groups = (warps + warps_per_group - 1) // warps_per_group
    return run(
        "qk_norm_rope",
        inputs=[q, k, v, q_weight, k_weight, inv_freq, offset],
        template=[
            ("T", dtype),
            ("HQ", n_heads),
            ("HKV", n_kv_heads),
            ("HD", head_dim),
            ("Q_STRIDE", q.shape[-1]),
            ("K_STRIDE", k.shape[-1]),
            ("V_STRIDE", v.shape[-1]),
            ("Q_OFF", q_off),
            ("K_OFF", k_off),
            ("V_OFF", v_off),
            ("NT", tuning.ROPE_THREADS),
            ("EPS_BITS", float_bits(eps)),
            ("PER_ROW_OFFSET", offset.size > 1),
        ],
        grid=(groups * tuning.ROPE_THREADS, 1, 1),
        threadgroup=(tuning.ROPE_THREADS, 1, 1),
        output_shapes=[
            (batch, n_heads, seq, head_dim),
            (batch, n_kv_heads, seq, head_dim),
            (batch, n_kv_heads, seq, head_dim),
        ],
        output_dtypes=[dtype, dtype, dtype],
    )


def _prologue_shape(head_dim: int) -> tuple[int, int]:
    """(threadgroups per head, threads per threadgroup) of the attention prologue."""
    split = split_count(tuning.PROLOGUE_SPLIT, lambda n: head_dim % (32 * n) == 0)
    warps = head_dim // split // tuning.PROLOGUE_ROWS_PER_WARP
    return split, min(tuning.PROLOGUE_THREADS, 32 * max(1, warps))


def prologue_covered(qkv, x: mx.array, attn) -> bool:
    """Whether the fused q/k/v projection (a FusedLinear) of `attn` can run in the prologue
    kernel."""
    if qkv is None or qkv.quant is None or qkv.quant.get("mode", "affine") != "affine":
        return False
    bits, group_size = qkv.quant["bits"], qkv.quant["group_size"]
    dims, head_dim = x.shape[-1], attn.head_dim
    split, threads = _prologue_shape(head_dim)
    tokens = x.size // dims
    return (
        bits in tuning.MOE_BITS
        and group_size in tuning.MOE_GROUP_SIZES
        and "biases" in qkv.params
        and qkv.params["scales"].dtype in tuning.FLOAT_TYPES
        and x.dtype in tuning.FLOAT_TYPES
        and dims % group_size == 0
        and head_dim % 64 == 0
        and (head_dim // split) % (threads // 32) == 0
        and tokens <= tuning.MAX_DECODE_TOKENS
        and tokens * (attn.n_heads + attn.n_kv_heads) <= tuning.TICKETS
    )


def attn_prologue(
    x: mx.array,
    input_norm: nn.RMSNorm,
    qkv,
    attn,
    offset: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v (B, heads, L, head_dim) from the residual stream x (B, L, D), one launch."""
    # 1-D always: MLX's Metal build passes a 0-d input as a scalar, which the body can't index.
    offset = offset.reshape(-1)
    p, quant = qkv.params, qkv.quant
    bits, group_size = quant["bits"], quant["group_size"]
    batch, seq, dims = x.shape
    n_heads, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    split, threads = _prologue_shape(head_dim)
    rows_per_warp = head_dim // split // (threads // 32)
    chunks_per_lane = -(-dims * bits // 128 // 32)
    # A chunk in flight holds ~6 registers (4 packed words, scale, bias) of the 64K per SM.
    in_flight = min(tuning.PROLOGUE_CHUNKS_IN_FLIGHT, max(1, (65536 // threads - 48) // 6))
    tokens = batch * seq
    per_group = max(1, min(tokens, threads // 32, tuning.PROLOGUE_TOKENS, tuning.PROLOGUE_MAX_ACC))
    unroll = next(
        (
            u
            for u in (8, 4, 2)
            if rows_per_warp % u == 0
            and u * per_group <= tuning.PROLOGUE_MAX_ACC
            and u * chunks_per_lane <= in_flight
        ),
        1,
    )
    q, k, v, _ = run(
        "attn_prologue",
        inputs=[
            x,
            input_norm.weight,
            p["weight"],
            p["scales"],
            p["biases"],
            attn.q_norm.weight,
            attn.k_norm.weight,
            attn.inv_freq(),
            offset,
            tickets(attn),
        ],  # fmt: skip
        template=[
            ("T", x.dtype),
            ("S", p["scales"].dtype),
            ("K", dims),
            ("GS", group_size),
            ("BITS", bits),
            ("HQ", n_heads),
            ("HKV", n_kv),
            ("HD", head_dim),
            ("NT", threads),
            ("RU", unroll),
            ("TB", per_group),
            ("SPLIT", split),
            ("EPS_IN_BITS", float_bits(input_norm.eps)),
            ("EPS_HEAD_BITS", float_bits(attn.q_norm.eps)),
            ("PER_ROW_OFFSET", offset.size > 1),
        ],
        grid=((n_heads + 2 * n_kv) * split * threads, -(-tokens // per_group), 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[
            (batch, n_heads, seq, head_dim),
            (batch, n_kv, seq, head_dim),
            (batch, n_kv, seq, head_dim),
            (tokens, (n_heads + n_kv) * head_dim) if split > 1 else (1,),
        ],
        output_dtypes=[x.dtype, x.dtype, x.dtype, mx.float32],
    )
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Decode attention


def attention_splits(length: int) -> int:
    """Threadgroups the decode attention spreads a cache of `length` keys over (the kernel
    derives the same number from the keys' shape)."""
    return min(tuning.ATTENTION_MAX_SPLITS, -(-length // tuning.ATTENTION_SPLIT_KEYS))


def _attention_threads(per_group: int, head_dim: int) -> int:
    """tuning.ATTENTION_THREADS, halved while the warps' partials would overflow threadgroup memory
    (32 KB on Apple GPUs; 48 KB of static shared memory on CUDA)."""
    limit = 32768 if backend() == "metal" else 49152
    threads = tuning.ATTENTION_THREADS
    while (
        threads > 32
        and (threads // 32 * (head_dim + 2) + tuning.ATTENTION_MAX_SPLITS) * per_group * 4
        > limit - 64
    ):
        threads //= 2
    return threads


def attention_site() -> str:
    # Launches add tuning.ATTENTION_MAX_SPLITS to each counter they use; another cap (a tuning run)
    # needs counters of its own.
    return f"attention/{tuning.ATTENTION_MAX_SPLITS}"


def decode_attention_covered(q: mx.array, keys, values, mask, cache) -> bool:
    """One query per row, on backends with the cross-threadgroup hand-off (tuning.SPLIT_BACKENDS:
    one threadgroup per KV head would leave a long cache to a handful of threadgroups), over
    - a plain KV cache (mlx-lm's KVCache: its keys and values are [..., :length, :] views with
      unit stride over head_dim), no mask, from tuning.ATTENTION_MIN_KEYS keys; or
    - a cache whose rows are left-padded and say where they start (`row_starts`, the server's
      batch), at any length: MLX's CUDA attention has no fused kernel for a mask array, and its
      unfused fallback costs several launches a layer."""
    starts = getattr(cache, "row_starts", None)
    if starts is None and (type(cache) is not KVCache or mask is not None):
        return False
    if not isinstance(keys, mx.array) or backend() not in tuning.SPLIT_BACKENDS:
        return False
    batch, heads, queries, head_dim = q.shape
    kv_heads = keys.shape[1]
    return (
        queries == 1
        and keys.ndim == 4
        and (starts is not None or keys.shape[2] >= tuning.ATTENTION_MIN_KEYS)
        and keys.shape == values.shape
        and keys.shape[0] == batch
        and keys.shape[3] == head_dim
        and head_dim % 128 == 0
        and heads % kv_heads == 0
        and heads // kv_heads in tuning.ATTENTION_CHECKED_GROUPS
        and q.dtype in tuning.FLOAT_TYPES
        and keys.dtype == q.dtype == values.dtype
        and batch * heads <= tuning.TICKETS
        and (starts is None or starts.shape == (batch,))
    )


def decode_attention(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    owner,
    starts: mx.array | None = None,
):
    """softmax(scale * q K^T) V for one query per row; (B, H, 1, D) like q, one launch.
    `owner` (the attention layer) holds the call site's arrival counters. `starts` (B,) int32:
    each row attends to keys [start, length) only (the server's batch, whose rows are
    left-padded), in place of a mask."""
    batch, heads, _, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    per_group = next(n for n in (tuning.ATTENTION_HEADS, 4, 2, 1) if group % n == 0)
    rows = batch * heads // per_group
    splits = attention_splits(length)
    threads = _attention_threads(per_group, head_dim)
    scratch = rows * tuning.ATTENTION_MAX_SPLITS * per_group if splits > 1 else 1
    out, _, _ = run(
        "decode_attention",
        inputs=[
            q,
            keys,
            values,
            dummy(mx.int32) if starts is None else starts,
            tickets(owner, attention_site()),
        ],
        template=[
            ("T", q.dtype),
            ("D", head_dim),
            ("G", group),
            ("HG", per_group),
            ("NT", threads),
            ("SPLIT_KEYS", tuning.ATTENTION_SPLIT_KEYS),
            ("MAX_SPLITS", tuning.ATTENTION_MAX_SPLITS),
            ("SCALE_BITS", float_bits(scale * tuning.LOG2_E)),
            ("ROW_STARTS", starts is not None),
        ],
        grid=(splits * threads, rows, 1),
        threadgroup=(threads, 1, 1),
        # The partials are scratch, needed only with several splits.
        output_shapes=[q.shape, (scratch, head_dim), (scratch, 2)],
        output_dtypes=[q.dtype, mx.float32, mx.float32],
    )
    return out

"""Fused GPU kernels for the decode step, built from `qwen3_mlx/kernel_sources/`.

Each kernel has ONE body (`<name>.inc`) shared by both GPU backends; a small per-backend
prelude (`prelude.metal.h`, `prelude.cuda.h`) supplies thread indices, warp/SIMD sums,
threadgroup memory and vector loads. On Apple GPUs they load through `mx.fast.metal_kernel`,
on MLX's CUDA backend through `mx.fast.cuda_kernel`, so a CUDA run checks the logic the
Metal build uses. The CPU backend, and any shape or quantization a kernel does not cover,
take the reference ops (`gather_qmm`, `mx.fast.rms_norm`/`rope`) in moe.py and model.py.

Switches (environment, read at call time; "auto" is the default):
  QWEN3_MLX_KERNELS=0|1|auto       all fused kernels
  QWEN3_MLX_MOE_KERNELS=0|1|auto   the MoE kernels (router, gate+up, down); overrides the above
  QWEN3_MLX_ROUTER_KERNEL=0        route on the reference ops, the other kernels still fused
  QWEN3_MLX_ATTENTION_KERNEL=0     decode attention through MLX's scaled_dot_product_attention
"0" forces the reference ops, "1" demands the kernels (an error on a backend without them),
"auto" uses them wherever the shape is covered on a backend where they have been verified:
CUDA (checked on an H200). The Metal build follows the same bodies but has not yet been
compiled or run on an Apple GPU, so there it is opt-in (QWEN3_MLX_KERNELS=1) until it has.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from .errors import ConfigError

SOURCE_DIR = Path(__file__).with_name("kernel_sources")

# name -> (input names, output names); bodies are SOURCE_DIR/<name>.inc
SPECS: dict[str, tuple[list[str], list[str]]] = {
    "moe_router": (
        ["x", "w", "scales", "biases", "norm_w", "tickets"],
        ["indices", "scores", "x_norm", "logits"],
    ),
    "moe_gate_up": (["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"], ["h"]),
    "moe_down": (["h", "idx", "scores", "w", "s", "b", "res"], ["y"]),
    "qk_norm_rope": (
        ["q", "k", "v", "q_weight", "k_weight", "inv_freq", "offset"],
        ["q_out", "k_out", "v_out"],
    ),
    "add_rms_norm": (["a", "b", "weight"], ["s", "n"]),
    "linear": (["x", "w", "s", "b", "res"], ["y"]),
    "attn_prologue": (
        [
            "x", "norm_w", "w", "scales", "biases", "q_weight", "k_weight", "inv_freq",
            "offset", "tickets",
        ],
        ["q_out", "k_out", "v_out", "raw"],
    ),
    "decode_attention": (["q", "keys", "values", "tickets"], ["out", "partial", "stats"]),
}  # fmt: skip
# Kernels that read some inputs as strided views (through their shape and strides) rather
# than have MLX copy them to row-major first: the KV cache's [..., :length, :] slices.
STRIDED_INPUTS = ("decode_attention",)

# Backends whose kernel builds have been run and checked (tests/test_kernels.py -m gpu).
VERIFIED_BACKENDS = ("cuda",)

# Coverage of the MoE kernels.
MOE_BITS = (4, 8)
MOE_GROUP_SIZES = (32, 64, 128)
MAX_DECODE_TOKENS = 32  # tokens a decode kernel takes (gate+up lists pairs in threadgroup memory)
# Arrival counters per split-kernel call site: one per (token, router) or (token group, head)
TICKETS = 4096
FLOAT_TYPES = (mx.bfloat16, mx.float16, mx.float32)

# Launch shapes (warps per threadgroup, output rows per warp).
GATE_UP_WARPS, GATE_UP_ROWS, GATE_UP_ROWS_ONE_TOKEN = 4, 2, 4
GATE_UP_PAIRS = 2  # pairs of one expert sharing each weight load
DOWN_WARPS, DOWN_ROWS = 4, 2
LINEAR_WARPS, LINEAR_ROWS = 4, 2
# Tokens sharing one pass over the weights. Few per pass keep more threadgroups busy (the
# output projection at batch 8: 2 per pass gave +11% decode over 8); the lm_head's 150k rows
# give parallelism enough, and each extra pass over its 150 MB would cost more.
LINEAR_TOKENS, LOGITS_TOKENS = 2, 8
# Above these token counts the output projection / the lm_head go to MLX's quantized_matmul.
# At batch 8 on the H200 that was 1-20% slower per decode step than these kernels (whole-step
# variants of benchmarks/tune_kernels.py, h200_notes.md), so both cover every decode size.
LINEAR_MAX_TOKENS = MAX_DECODE_TOKENS
LOGITS_MAX_TOKENS = MAX_DECODE_TOKENS
# The router's gate logits for one token are spread over ROUTER_SPLIT threadgroups (SMs) of
# ROUTER_EXPERTS_PER_WARP experts per warp; the last to finish picks the top k.
ROUTER_SPLIT, ROUTER_EXPERTS_PER_WARP = 8, 4
# Backends where split kernels hand work across threadgroups (tickets, device-scope fences).
# Metal's hand-off (Metal 3.2 fences; maybe coherent(device) buffers) is unvalidated, so
# there the router and prologue keep one threadgroup per token / head.
SPLIT_BACKENDS = ("cuda",)
ROPE_THREADS = 128
# The attention prologue spreads each head's rows over PROLOGUE_SPLIT threadgroups (1: one
# threadgroup per head), PROLOGUE_ROWS_PER_WARP rows per warp, at most PROLOGUE_THREADS.
PROLOGUE_SPLIT, PROLOGUE_ROWS_PER_WARP = 4, 4
PROLOGUE_THREADS = 256
PROLOGUE_CHUNKS_IN_FLIGHT = 8  # 16-byte weight chunks per lane the prologue requests at once
PROLOGUE_TOKENS = 4  # tokens sharing each weight load
PROLOGUE_MAX_ACC = 8  # accumulators per lane (rows x tokens)
# Decode attention: keys per split of the cache, at most MAX splits (a power of two: the
# arrival counters wrap at 2^32; <= 32: the merge gives each split a lane), query heads per
# threadgroup, threads per threadgroup (256: the H200 profile of 128 showed one warp per
# scheduler, stalled on latency; there are only splits x KV heads threadgroups at batch 1).
ATTENTION_SPLIT_KEYS, ATTENTION_MAX_SPLITS = 32, 32
ATTENTION_HEADS, ATTENTION_THREADS = 8, 256
# Shorter caches stay on MLX's attention: its vector kernel takes ~10 us per 30B layer at 128
# keys on the H200 and is cheaper to dispatch (this kernel is called outside the compiled
# steps, where MLX rebuilds a custom kernel's source text at every call). From 256 keys on
# MLX switches to cuDNN (21 us per layer at 2048 keys; this kernel 12.9 us).
ATTENTION_MIN_KEYS = 1024
# Query heads per KV head whose launch shapes have passed the GPU tests on the H200 (0.6B-1.7B:
# 2; 4B, 8B: 4; 14B: 5; 30B, 32B: 8; 235B: 16).
ATTENTION_CHECKED_GROUPS = (2, 4, 5, 8, 16)
LOG2_E = math.log2(math.e)  # the kernel's softmax runs in base 2


def backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU these kernels run on, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ConfigError(f"{name}={value!r}: expected 0, 1 or auto")
    return value


def enabled(kind: str = "all", override: str | bool | None = None) -> bool:
    """Whether fused kernels of `kind` ('moe' or 'all') should run now."""
    if override is not None:
        value = {True: "1", False: "0"}.get(override, str(override).lower())
    elif kind == "moe" and "QWEN3_MLX_MOE_KERNELS" in os.environ:
        value = _switch("QWEN3_MLX_MOE_KERNELS")
    else:
        value = _switch("QWEN3_MLX_KERNELS")
    if value == "0":
        return False
    name = backend()
    if value == "1":
        if name is None:
            raise ConfigError(
                f"fused kernels forced on, but device {mx.default_device()} has no Metal/CUDA "
                "backend"
            )
        return True
    return name in VERIFIED_BACKENDS


def kernel_source(name: str, backend_name: str, comments: bool = True) -> tuple[str, str]:
    """(header, body) of kernel `name` for 'metal' or 'cuda', as handed to MLX; without
    comments and blank lines with comments=False."""
    prelude = (SOURCE_DIR / f"prelude.{backend_name}.h").read_text()
    header, prefix = prelude.split("// ---- body prefix ----\n")
    header += (SOURCE_DIR / "common.h").read_text()
    body = prefix + (SOURCE_DIR / f"{name}.inc").read_text()
    if not comments:
        return _without_comments(header), _without_comments(body)
    return header, body


def _without_comments(source: str) -> str:
    """`source` without // comments and blank lines (no string literal in the kernel sources
    holds a "//")."""
    return re.sub(r"\n\s*\n", "\n", re.sub(r"[ \t]*//[^\n]*", "", source))


# MLX's CUDA backend (0.32.4) rebuilds a custom kernel's whole source text at every call and
# hashes it at every evaluation (docs/FACTS.md): KERNEL_COMMENTS=False hands it the sources a
# third shorter. As written (True) until a whole-step measurement shows the difference
# (benchmarks/tune_kernels.py, variant "no comments").
KERNEL_COMMENTS = True


@functools.cache
def _kernel(name: str, backend_name: str, comments: bool = True):
    inputs, outputs = SPECS[name]
    header, body = kernel_source(name, backend_name, comments)
    make = mx.fast.metal_kernel if backend_name == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"qwen3_mlx_{name}",
        input_names=inputs,
        output_names=outputs,
        source=body,
        header=header,
        ensure_row_contiguous=name not in STRIDED_INPUTS,
    )


def _run(name: str, **kwargs):
    return _kernel(name, backend(), KERNEL_COMMENTS)(**kwargs)


# ---------------------------------------------------------------------------------------------
# Coverage checks


def affine_params(layer) -> tuple[mx.array, mx.array, mx.array, int, int] | None:
    """(weight, scales, biases, group_size, bits) of an affine-quantized layer, else None."""
    if getattr(layer, "mode", "affine") != "affine" or "scales" not in layer:
        return None
    if "biases" not in layer or "bias" in layer:
        return None
    return layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits


def _quant_ok(params, in_dims: int) -> bool:
    if params is None:
        return False
    _, scales, _, group_size, bits = params
    return (
        bits in MOE_BITS
        and group_size in MOE_GROUP_SIZES
        and in_dims % group_size == 0
        and scales.dtype in FLOAT_TYPES
    )


def _split(limit: int, fits) -> int:
    """Threadgroups (8, 4, 2 or 1, at most `limit`, `fits(n)`) a split kernel spreads one
    token's or head's work over; 1 on backends without the cross-threadgroup hand-off."""
    most = limit if backend() in SPLIT_BACKENDS else 1
    return next(n for n in (8, 4, 2, 1) if n <= most and fits(n))


def _router_shape(num_experts: int) -> tuple[int, int]:
    """(threadgroups per token, threads per threadgroup) of the router kernel."""
    split = _split(ROUTER_SPLIT, lambda n: num_experts % n == 0)
    per_group = num_experts // split
    warps = [w for w in (8, 4, 2) if per_group % w == 0]  # <= 256 threads: registers
    warps = [w for w in warps if per_group // w >= ROUTER_EXPERTS_PER_WARP] or warps[-1:] or [1]
    return split, 32 * warps[0]


def tickets(owner, site: str = "") -> mx.array:
    """Arrival counters of a split kernel's call site (`owner`: the layer it serves; `site`
    tells apart the kernels of one layer).

    A split kernel's threadgroups take tickets from these counters in device memory, so
    each call site needs its own set: launches that share counters must run one after the
    other, which a layer's launches do (each depends on the previous layer's output).
    Made outside any compile trace (`prepare`).
    """
    attr = f"_tickets{site}"
    counters = owner.__dict__.get(attr)
    if counters is None:
        counters = mx.zeros((TICKETS,), mx.uint32)  # made on the device: device memory
        mx.eval(counters)
        object.__setattr__(owner, attr, counters)
    return counters


def router_kernel_enabled() -> bool:
    """QWEN3_MLX_ROUTER_KERNEL=0 keeps routing on the reference ops while the expert kernels
    run (to tell the two apart when a result looks wrong); otherwise the MoE switch decides."""
    return _switch("QWEN3_MLX_ROUTER_KERNEL") != "0"


def router_covered(gate, x: mx.array, num_experts: int, top_k: int) -> bool:
    params = affine_params(gate)
    return (
        router_kernel_enabled()
        and _quant_ok(params, x.shape[-1])
        and x.dtype in FLOAT_TYPES
        and x.shape[-1] % 8 == 0
        and top_k <= min(num_experts, 32)
        and x.size // x.shape[-1] <= MAX_DECODE_TOKENS
    )


def _gate_up_rows_fit(hidden: int) -> bool:
    """Whether gate+up's row tiles (one token's or a batch's) divide `hidden`."""
    return hidden % (GATE_UP_WARPS * max(GATE_UP_ROWS, GATE_UP_ROWS_ONE_TOKEN)) == 0


def experts_covered(experts, x: mx.array, top_k: int) -> bool:
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    params = [affine_params(p) for p in (gate, up, down)]
    if any(p is None for p in params):
        return False
    num_experts, dims = params[0][0].shape[0], x.shape[-1]
    hidden = params[2][0].shape[-1] * 32 // params[2][4]
    tokens = x.size // x.shape[-1]
    return (
        x.dtype in FLOAT_TYPES
        and tokens <= MAX_DECODE_TOKENS
        and top_k <= num_experts
        and _quant_ok(params[0], dims)
        and _quant_ok(params[1], dims)
        and _quant_ok(params[2], hidden)
        and params[0][3:] == params[1][3:]
        and _gate_up_rows_fit(hidden)
        and dims % (DOWN_WARPS * DOWN_ROWS) == 0
    )


# ---------------------------------------------------------------------------------------------
# MoE


# Kernels read raw row-major memory, so inputs are passed without reshapes and outputs are
# created in their final shapes: every reshape/astype/view is one more primitive the host has
# to dispatch per layer per token, and host work is what bounds decode speed.


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
    norm_w = norm.weight if norm is not None else _dummy(x.dtype)
    shape = (*x.shape[:-1], top_k)
    indices, scores, x_norm, _ = _run(
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


@functools.cache
def _dummy(dtype) -> mx.array:
    """A placeholder for an unused kernel input (never read)."""
    array = mx.zeros((8,), dtype)
    mx.eval(array)
    return array


@functools.cache
def float_bits(value: float) -> int:
    """A float32's bits as a template constant (kernels read it back with AS_FLOAT).

    Norm epsilons are baked into the kernels rather than passed as arrays: MLX keeps arrays
    of 8 bytes or less in host-side unified memory, and every GPU read of one crosses the
    host link (run R/S on the H200: the kernels reading one waited on it for most of
    their time)."""
    return int(np.array(value, np.float32).view(np.int32))


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
    rows = GATE_UP_ROWS_ONE_TOKEN if single else GATE_UP_ROWS
    (h,) = _run(
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
            ("NW", GATE_UP_WARPS),
            ("RPW", rows),
            ("PG", 1 if single else min(GATE_UP_PAIRS, pairs)),
            ("SINGLE_TOKEN", single),
        ],
        grid=(hidden // (GATE_UP_WARPS * rows) * GATE_UP_WARPS * 32, pairs, 1),
        threadgroup=(GATE_UP_WARPS * 32, 1, 1),
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
    res = residual if has_res else _dummy(dtype)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    (y,) = _run(
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
            ("NW", DOWN_WARPS),
            ("RPW", DOWN_ROWS),
            ("HAS_RES", has_res),
        ],
        grid=(dims // (DOWN_WARPS * DOWN_ROWS) * DOWN_WARPS * 32, tokens, 1),
        threadgroup=(DOWN_WARPS * 32, 1, 1),
        output_shapes=[tuple(out_shape)],
        output_dtypes=[dtype],
    )
    return y


# ---------------------------------------------------------------------------------------------
# Dense layers through the same kernels (one "expert", every token routed to it)


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
        mx.zeros((MAX_DECODE_TOKENS, 1), mx.uint32),
        mx.ones((MAX_DECODE_TOKENS, 1), mx.float32),
    )
    mx.eval(arrays)
    return arrays


def prepare(model) -> None:
    """Build, outside any compile trace, the constant views the dense kernels use and the
    split kernels' arrival counters."""
    for dtype in FLOAT_TYPES:
        _dummy(dtype)
    _routing_to_one()
    for layer in model.layers:
        tickets(layer.self_attn)
        tickets(layer.self_attn, _attention_site())
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
    Up to `tokens_per_pass` (default LINEAR_TOKENS) tokens share each read of the weights.
    """
    w, scales, biases, group_size, bits = params
    out_dims, in_dims = w.shape[0], w.shape[1] * 32 // bits
    tokens = x.size // in_dims
    per_group = min(tokens, tokens_per_pass or LINEAR_TOKENS)
    has_res = residual is not None
    (y,) = _run(
        "linear",
        inputs=[x, w, scales, biases, residual if has_res else _dummy(x.dtype)],
        template=[
            ("T", x.dtype),
            ("S", scales.dtype),
            ("K", in_dims),
            ("N", out_dims),
            ("M", tokens),
            ("GS", group_size),
            ("BITS", bits),
            ("MT", per_group),
            ("NW", LINEAR_WARPS),
            ("RPW", LINEAR_ROWS),
            ("HAS_RES", has_res),
        ],
        grid=(
            out_dims // (LINEAR_WARPS * LINEAR_ROWS) * LINEAR_WARPS * 32,
            -(-tokens // per_group),
            1,
        ),
        threadgroup=(LINEAR_WARPS * 32, 1, 1),
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
        _quant_ok(params, in_dims)
        and x.dtype in FLOAT_TYPES
        and x.size % in_dims == 0
        and out_dims % (LINEAR_WARPS * LINEAR_ROWS) == 0
        and x.size // in_dims <= MAX_DECODE_TOKENS
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
        and tokens <= LINEAR_MAX_TOKENS
    )


def logits_covered(head, hidden: mx.array) -> bool:
    """The output projection (lm_head, or tied quantized embeddings) for 2-32 tokens.
    One token stays on MLX's quantized matrix-vector kernel."""
    tokens = hidden.size // hidden.shape[-1]
    return (
        type(head) in (nn.QuantizedLinear, nn.QuantizedEmbedding)
        and 2 <= tokens <= LOGITS_MAX_TOKENS
        and _linear_ok(head, hidden)
    )


def logits(head, hidden: mx.array) -> mx.array:
    out_shape = (*hidden.shape[:-1], head["weight"].shape[0])
    return linear(hidden, affine_params(head), out_shape, tokens_per_pass=LOGITS_TOKENS)


def mlp_covered(mlp, x: mx.array) -> bool:
    gate, up, down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if any(type(p) is not nn.QuantizedLinear for p in (gate, up, down_proj)):
        return False  # e.g. tensor-parallel shards: they communicate in their own call
    params = [affine_params(p) for p in (gate, up, down_proj)]
    if any(p is None for p in params):
        return False
    hidden = gate["weight"].shape[0]
    return (
        _quant_ok(params[0], x.shape[-1])
        and params[0][3:] == params[1][3:]
        and _quant_ok(params[2], hidden)
        and _gate_up_rows_fit(hidden)
        and x.shape[-1] % (DOWN_WARPS * DOWN_ROWS) == 0
        and x.dtype in FLOAT_TYPES
        and x.size // x.shape[-1] <= MAX_DECODE_TOKENS
    )


def dense_mlp(mlp, x: mx.array, residual: mx.array | None = None) -> mx.array:
    """(residual +) down(silu(gate(x)) * up(x)) for a quantized SwiGLU MLP, two launches."""
    gate, up = OneExpert.of(mlp.gate_proj), OneExpert.of(mlp.up_proj)
    idx, _ = _routing_to_one()
    h = gate_up(x, idx, gate.params, up.params, gate.group_size, gate.bits)
    return linear(h, affine_params(mlp.down_proj), x.shape, residual)


# ---------------------------------------------------------------------------------------------
# Attention-side fusions


def qk_norm_rope_covered(x: mx.array, head_dim: int) -> bool:
    return x.dtype in FLOAT_TYPES and head_dim % 64 == 0


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
    warps_per_group = ROPE_THREADS // 32
    groups = (warps + warps_per_group - 1) // warps_per_group
    return _run(
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
            ("NT", ROPE_THREADS),
            ("EPS_BITS", float_bits(eps)),
            ("PER_ROW_OFFSET", offset.size > 1),
        ],
        grid=(groups * ROPE_THREADS, 1, 1),
        threadgroup=(ROPE_THREADS, 1, 1),
        output_shapes=[
            (batch, n_heads, seq, head_dim),
            (batch, n_kv_heads, seq, head_dim),
            (batch, n_kv_heads, seq, head_dim),
        ],
        output_dtypes=[dtype, dtype, dtype],
    )


def add_rms_norm_covered(x: mx.array) -> bool:
    return x.dtype in FLOAT_TYPES and x.shape[-1] % 32 == 0


def add_rms_norm(
    a: mx.array, b: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """(a + b, rms_norm(a + b) * weight) in one pass."""
    dims = a.shape[-1]
    threads = next(n for n in (256, 128, 64, 32) if dims % n == 0)
    rows = a.size // dims
    s, n = _run(
        "add_rms_norm",
        inputs=[a.reshape(rows, dims), b.reshape(rows, dims), weight],
        template=[("T", a.dtype), ("D", dims), ("NT", threads), ("EPS_BITS", float_bits(eps))],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(rows, dims), (rows, dims)],
        output_dtypes=[a.dtype, a.dtype],
    )
    return s.reshape(a.shape), n.reshape(a.shape)


def _prologue_shape(head_dim: int) -> tuple[int, int]:
    """(threadgroups per head, threads per threadgroup) of the attention prologue."""
    split = _split(PROLOGUE_SPLIT, lambda n: head_dim % (32 * n) == 0)
    warps = head_dim // split // PROLOGUE_ROWS_PER_WARP
    return split, min(PROLOGUE_THREADS, 32 * max(1, warps))


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
        bits in MOE_BITS
        and group_size in MOE_GROUP_SIZES
        and "biases" in qkv.params
        and qkv.params["scales"].dtype in FLOAT_TYPES
        and x.dtype in FLOAT_TYPES
        and dims % group_size == 0
        and head_dim % 64 == 0
        and (head_dim // split) % (threads // 32) == 0
        and tokens <= MAX_DECODE_TOKENS
        and tokens * (attn.n_heads + attn.n_kv_heads) <= TICKETS
    )


def attn_prologue(
    x: mx.array,
    input_norm: nn.RMSNorm,
    qkv,
    attn,
    offset: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v (B, heads, L, head_dim) from the residual stream x (B, L, D), one launch."""
    p, quant = qkv.params, qkv.quant
    bits, group_size = quant["bits"], quant["group_size"]
    batch, seq, dims = x.shape
    n_heads, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    split, threads = _prologue_shape(head_dim)
    rows_per_warp = head_dim // split // (threads // 32)
    chunks_per_lane = -(-dims * bits // 128 // 32)
    # A chunk in flight holds ~6 registers (4 packed words, scale, bias) of the 64K per SM.
    in_flight = min(PROLOGUE_CHUNKS_IN_FLIGHT, max(1, (65536 // threads - 48) // 6))
    tokens = batch * seq
    per_group = max(1, min(tokens, threads // 32, PROLOGUE_TOKENS, PROLOGUE_MAX_ACC))
    unroll = next(
        (
            u
            for u in (8, 4, 2)
            if rows_per_warp % u == 0
            and u * per_group <= PROLOGUE_MAX_ACC
            and u * chunks_per_lane <= in_flight
        ),
        1,
    )
    q, k, v, _ = _run(
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
    return min(ATTENTION_MAX_SPLITS, -(-length // ATTENTION_SPLIT_KEYS))


def _attention_threads(per_group: int, head_dim: int) -> int:
    """ATTENTION_THREADS, halved while the warps' partials would overflow threadgroup memory
    (32 KB on Apple GPUs; 48 KB of static shared memory on CUDA)."""
    limit = 32768 if backend() == "metal" else 49152
    threads = ATTENTION_THREADS
    while (
        threads > 32
        and (threads // 32 * (head_dim + 2) + ATTENTION_MAX_SPLITS) * per_group * 4 > limit - 64
    ):
        threads //= 2
    return threads


def _attention_site() -> str:
    # Launches add ATTENTION_MAX_SPLITS to each counter they use; another cap (a tuning run)
    # needs counters of its own.
    return f"attention/{ATTENTION_MAX_SPLITS}"


def decode_attention_covered(q: mx.array, keys, values, mask, cache) -> bool:
    """One query per row over a plain KV cache (mlx-lm's KVCache: its keys and values are
    [..., :length, :] views with unit stride over head_dim), no mask, from ATTENTION_MIN_KEYS
    keys, on backends with the cross-threadgroup hand-off (SPLIT_BACKENDS: one threadgroup
    per KV head would leave a long cache to a handful of threadgroups)."""
    if type(cache) is not KVCache or mask is not None or not isinstance(keys, mx.array):
        return False
    if backend() not in SPLIT_BACKENDS:
        return False
    if _switch("QWEN3_MLX_ATTENTION_KERNEL") == "0":
        return False
    batch, heads, queries, head_dim = q.shape
    kv_heads = keys.shape[1]
    return (
        queries == 1
        and keys.ndim == 4
        and keys.shape[2] >= ATTENTION_MIN_KEYS
        and keys.shape == values.shape
        and keys.shape[0] == batch
        and keys.shape[3] == head_dim
        and head_dim % 128 == 0
        and heads % kv_heads == 0
        and heads // kv_heads in ATTENTION_CHECKED_GROUPS
        and q.dtype in FLOAT_TYPES
        and keys.dtype == q.dtype == values.dtype
        and batch * heads <= TICKETS
    )


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, scale: float, owner):
    """softmax(scale * q K^T) V for one query per row; (B, H, 1, D) like q, one launch.
    `owner` (the attention layer) holds the call site's arrival counters."""
    batch, heads, _, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    per_group = next(n for n in (ATTENTION_HEADS, 4, 2, 1) if group % n == 0)
    rows = batch * heads // per_group
    splits = attention_splits(length)
    threads = _attention_threads(per_group, head_dim)
    scratch = rows * ATTENTION_MAX_SPLITS * per_group if splits > 1 else 1
    out, _, _ = _run(
        "decode_attention",
        inputs=[q, keys, values, tickets(owner, _attention_site())],
        template=[
            ("T", q.dtype),
            ("D", head_dim),
            ("G", group),
            ("HG", per_group),
            ("NT", threads),
            ("SPLIT_KEYS", ATTENTION_SPLIT_KEYS),
            ("MAX_SPLITS", ATTENTION_MAX_SPLITS),
            ("SCALE_BITS", float_bits(scale * LOG2_E)),
        ],
        grid=(splits * threads, rows, 1),
        threadgroup=(threads, 1, 1),
        # The partials are scratch, needed only with several splits.
        output_shapes=[q.shape, (scratch, head_dim), (scratch, 2)],
        output_dtypes=[q.dtype, mx.float32, mx.float32],
    )
    return out

"""The Metal build of every fused kernel, compiled with clang++ and run on the CPU.

No Mac here: tests/metal_emulation/ writes each kernel's source as MLX's metal_kernel would
(signature from input/output names, dtypes, template arguments and the attributes the body
names), compiles it against a C++ emulation of the Metal vocabulary (metal_shim.h) - once
with Metal's address spaces as clang address spaces (type check), once to run - and runs
each threadgroup on one OS thread per GPU thread (real barriers, 32-lane SIMD groups,
threadgroups in a shuffled order). Launches go to the emulator (`kernels.launched_by`, which
also makes the launch functions choose the Metal launch shapes) and the model's modules run
every kernel (class-level plans); results are compared with the reference ops on MLX's CPU
backend.
Set QWEN3_MLX_KERNEL_REPORT=path to log the measured errors.
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen3_mlx import kernels
from qwen3_mlx.kernels import OFF, KernelPlan, build, tuning
from qwen3_mlx.model import MLP, Attention, DecoderLayer, Model, Qwen3Model
from qwen3_mlx.moe import Experts, SparseMoeBlock
from tests.metal_emulation import emulate

pytestmark = pytest.mark.skipif(
    not emulate.clang_available(), reason="clang++ not installed (apt-get install clang)"
)


def report(test: str, **values) -> None:
    path = os.environ.get("QWEN3_MLX_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "metal_emulation/" + test, **values}, default=str) + "\n")


def f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel_err(out, ref) -> float:
    out, ref = f64(out), f64(ref)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def max_abs(out, ref) -> float:
    return float(np.abs(f64(out) - f64(ref)).max())


# Every module class that reads a plan; the tests build modules on their own, so the plan is
# set on the classes.
PLANNED = (Attention, MLP, DecoderLayer, Qwen3Model, Model, SparseMoeBlock, Experts)
ALL_ON = KernelPlan(
    backend="metal", norm=True, rope=True, prologue=True, linear=True, dense_mlp=True,
    attention=True, router=True, experts=True,
)  # fmt: skip


def _use(monkeypatch, plan: KernelPlan) -> None:
    for cls in PLANNED:
        monkeypatch.setattr(cls, "kernel_plan", plan)


@pytest.fixture
def metal(monkeypatch):
    """Kernels on, the Metal backend's launch shapes, launches through the emulator."""
    # QWEN3_MLX_METAL_PRELUDE=path: run every test on another prelude.metal.h (to see the
    # tests fail on a deliberately broken one)
    path = os.environ.get("QWEN3_MLX_METAL_PRELUDE")
    prelude = open(path).read() if path else None
    emulator = emulate.Emulator(seed=12345, prelude=prelude)
    _use(monkeypatch, ALL_ON)
    with kernels.launched_by(emulator, "metal"):
        yield emulator


def _reference(monkeypatch, fn):
    _use(monkeypatch, OFF)
    try:
        out = fn()
        mx.eval(out)
        return out
    finally:
        _use(monkeypatch, ALL_ON)


def _launched(emulator, name: str) -> int:
    return sum(1 for launch, _ in emulator.launches if launch.name == name)


# ---------------------------------------------------------------------------------------------
# The generated source


def test_signature_follows_mlx(metal):
    """Small inputs go to the constant address space, `_shape`/`_strides` where the body
    names them, the thread attributes the body prefix names, MLX's kernel name."""
    offset = mx.array([3], mx.int32)
    inputs = [mx.zeros((1, 1, 256), mx.bfloat16)] * 3 + [
        mx.ones((64,), mx.bfloat16), mx.ones((64,), mx.bfloat16), mx.ones((32,), mx.float32),
        offset,
    ]  # fmt: skip
    launch = emulate.prepare(
        "qk_norm_rope", inputs,
        [("T", mx.bfloat16), ("HQ", 2), ("HKV", 1), ("HD", 64), ("Q_STRIDE", 256),
         ("K_STRIDE", 256), ("V_STRIDE", 256), ("Q_OFF", 0), ("K_OFF", 128), ("V_OFF", 192),
         ("NT", 128), ("EPS_BITS", 1), ("PER_ROW_OFFSET", False)],
        (128, 1, 1), (128, 1, 1), [(1, 2, 1, 64), (1, 1, 1, 64), (1, 1, 1, 64)],
        [mx.bfloat16] * 3,
    )  # fmt: skip
    src = launch.mlx_source
    assert "template <typename T, int HQ, int HKV, int HD, int Q_STRIDE" in src
    assert (
        "bool PER_ROW_OFFSET>\n[[kernel]] void custom_kernel_qwen3_mlx_qk_norm_rope_bfloat16_t_2_1_64_"
        in src
    )
    assert (
        "  const device bfloat16_t* q [[buffer(0)]],\n  const constant int* q_shape [[buffer(1)]],\n"
        in src
    )
    assert "  const constant int32_t* offset [[buffer(7)]],\n" in src
    assert "  device bfloat16_t* v_out [[buffer(10)]],\n" in src
    assert "  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]],\n" in src
    assert "  uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]) {\n" in src
    assert '\ntemplate [[host_name("custom_kernel_qwen3_mlx_qk_norm_rope_' in src


# ---------------------------------------------------------------------------------------------
# Each kernel against the reference ops


@pytest.mark.parametrize("dims, rows", [(256, 3), (96, 2)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
def test_add_rms_norm(metal, dims, rows, dtype):
    mx.random.seed(dims + rows)
    a = mx.random.normal((rows, dims)).astype(dtype)
    b = mx.random.normal((rows, dims)).astype(dtype)
    w = (1 + 0.1 * mx.random.normal((dims,))).astype(dtype)
    s, n = kernels.add_rms_norm(a, b, w, 1e-6)
    ref_s = a + b
    ref_n = mx.fast.rms_norm(ref_s, w, 1e-6)
    err = rel_err(n, ref_n)
    report("add_rms_norm", dims=dims, dtype=dtype, rel=err, max_abs=max_abs(n, ref_n))
    assert mx.array_equal(s, ref_s).item()
    assert err < (1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 3, 4])
def test_linear(metal, bits, group_size, tokens):
    """The few-token quantized linear, with a residual, against dequantize + matmul."""
    mx.random.seed(bits * 1000 + group_size + tokens)
    lin = nn.QuantizedLinear(256, 24, bias=False, group_size=group_size, bits=bits)
    lin.set_dtype(mx.bfloat16)
    x = mx.random.normal((tokens, 256)).astype(mx.bfloat16)
    res = mx.random.normal((tokens, 24)).astype(mx.bfloat16)
    mx.eval(lin.parameters(), x, res)
    params = kernels.affine_params(lin)
    w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size, bits).astype(mx.float32)
    exact = x.astype(mx.float32) @ w.T
    out = kernels.linear(x, params, (tokens, 24), res, tokens_per_pass=2)
    want = exact + res.astype(mx.float32)
    err = rel_err(out, want)
    report("linear", bits=bits, group_size=group_size, tokens=tokens, rel=err,
           max_abs=max_abs(out, want), reference_rel=rel_err(res + lin(x), want))  # fmt: skip
    assert out.shape == (tokens, 24) and out.dtype == mx.bfloat16
    assert err < 8e-3


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=str)
def test_linear_other_dtypes(metal, dtype):
    """float16 and float32 activations and scales (the prelude's other load8 overloads)."""
    mx.random.seed(5)
    lin = nn.QuantizedLinear(512, 16, bias=False, group_size=64, bits=4)
    lin.set_dtype(dtype)
    x = mx.random.normal((2, 512)).astype(dtype)
    mx.eval(lin.parameters(), x)
    w = mx.dequantize(lin.weight, lin.scales, lin.biases, 64, 4).astype(mx.float32)
    want = x.astype(mx.float32) @ w.T
    out = kernels.linear(x, kernels.affine_params(lin), (2, 16))
    err = rel_err(out, want)
    report("linear", dtype=dtype, rel=err, max_abs=max_abs(out, want))
    assert out.dtype == dtype and err < (1e-5 if dtype == mx.float32 else 2e-3)


ROUTER_CASES = [
    # (dims, experts, top_k, tokens, bits, group_size, normalize, norm_in, split)
    (256, 8, 2, 2, 4, 32, True, False, False),
    (256, 16, 4, 3, 8, 64, False, False, False),
    (256, 64, 8, 2, 4, 128, True, True, False),
    (256, 32, 1, 4, 8, 32, True, False, False),
    (256, 128, 8, 3, 4, 64, True, True, True),  # the CUDA build's 8-way split + tickets
    (512, 64, 4, 1, 8, 128, False, False, True),
]


def _block(dims, hidden, experts, top_k, bits, group_size, seed, dtype=mx.bfloat16):
    from qwen3_mlx.moe import SparseMoeBlock

    mx.random.seed(seed)
    block = SparseMoeBlock(dims, hidden, experts, top_k, norm_topk_prob=True)
    block.gate.weight = block.gate.weight * 8  # spread the router's logits
    nn.quantize(block, group_size, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    block.set_dtype(mx.bfloat16)
    block.set_dtype(dtype)  # float32: the same (bf16-valued) scales, for a float32 truth
    mx.eval(block.parameters())
    return block


@pytest.mark.parametrize(
    "case", ROUTER_CASES, ids=lambda c: "d{}-e{}-k{}-t{}-b{}-g{}-n{}-in{}-split{}".format(*c)
)
def test_moe_router(metal, monkeypatch, case):
    """Picks and scores against float32 truth (the same quantized weights, float32 math):
    MLX's CPU quantized matmul in bf16 is itself ~2% off, more than the kernel."""
    dims, experts, top_k, tokens, bits, group_size, normalize, norm_in, split = case
    if split:  # Metal keeps one threadgroup per token (unvalidated hand-off); try it anyway
        monkeypatch.setattr(tuning, "SPLIT_BACKENDS", ("cuda", "metal"))
    seed = tokens + experts
    block = _block(dims, 128, experts, top_k, bits, group_size, seed)
    x = (2 * mx.random.normal((tokens, 1, dims))).astype(mx.bfloat16)
    norm = None
    if norm_in:
        norm = nn.RMSNorm(dims, eps=1e-6)
        norm.weight = (1 + 0.1 * mx.random.normal((dims,))).astype(mx.bfloat16)
    xn = norm(x) if norm_in else x  # bf16, as the kernel rounds its normalised input
    gate = block.gate
    w = mx.dequantize(gate.weight, gate.scales, gate.biases, group_size, bits)
    exact = f64(xn).reshape(tokens, dims) @ f64(w).T
    bf16_ref = f64(_reference(monkeypatch, lambda: gate(xn))).reshape(tokens, experts)
    idx, scores, normed = kernels.moe_router(x, gate, top_k, normalize, norm)
    assert _launched(metal, "moe_router") == 1
    assert idx.dtype == mx.uint32 and idx.shape == (tokens, 1, top_k)
    if norm_in:  # at most one bf16 rounding step from the reference norm
        assert (np.abs(f64(normed) - f64(xn)) / (np.abs(f64(xn)) + 1e-3)).max() <= 2.0**-7
    launch, bufs = metal.launches[-1]
    logits = f64(emulate.to_array(bufs[-1], *launch.outputs[3]))
    groups = launch.grid[0] // launch.threadgroup[0]
    assert groups == (tuning.ROUTER_SPLIT if split else 1)
    if split:  # each token's counter advanced by the split, the others untouched
        tickets = np.frombuffer(bufs[[n for _, n in launch.buffers].index("tickets")], np.uint32)
        assert (tickets[:tokens] == groups).all() and (tickets[tokens:] == 0).all()
    idx = np.array(idx).reshape(tokens, -1)
    scores = f64(scores).reshape(tokens, -1)
    compared, worst = 0, 0.0
    for t in range(tokens):
        ordered = np.sort(exact[t])[::-1]
        if top_k < experts and ordered[top_k - 1] - ordered[top_k] < 2e-2 * max(
            1.0, abs(ordered[top_k - 1])
        ):
            continue  # a near-tie at the cut: either expert is right
        want_idx = np.argsort(-exact[t], kind="stable")[:top_k]
        assert set(idx[t].tolist()) == set(want_idx.tolist()), (t, idx[t], want_idx)
        assert np.all(np.diff(exact[t][idx[t]]) <= 1e-2 * np.abs(exact[t]).max())  # falling p
        probs = np.exp(exact[t] - exact[t].max())
        probs /= probs.sum()
        want = probs[idx[t]] / (probs[idx[t]].sum() if normalize else 1.0)
        err = np.abs(scores[t] - want) / want
        bound = np.exp(2 * 2.0**-8 * np.abs(exact[t]).max()) - 1 + 1e-3  # logits in bf16
        assert err.max() <= bound, (t, err, bound)
        worst = max(worst, float(err.max()))
        compared += 1
    logit_err = float(np.abs(logits - exact).max() / np.abs(exact).max())
    ref_logit_err = float(np.abs(bf16_ref - exact).max() / np.abs(exact).max())
    report("moe_router", case=case, threadgroups_per_token=groups, tokens_compared=compared,
           max_rel_score=worst,
           logits_max_rel=logit_err, reference_logits_max_rel=ref_logit_err)  # fmt: skip
    assert compared >= 1
    assert logit_err <= 2.0**-7  # the kernel's logits: float32 sums rounded once to bf16


EXPERT_CASES = [
    # (dims, hidden, experts, top_k, tokens, bits, group_size)
    (256, 128, 8, 2, 1, 4, 32),
    (256, 128, 16, 4, 3, 8, 64),
    (256, 128, 8, 2, 4, 4, 128),
    (128, 64, 4, 4, 2, 8, 32),  # every expert picked by both tokens: gate+up shares loads
    (256, 128, 32, 8, 2, 4, 64),
]


@pytest.mark.parametrize(
    "case", EXPERT_CASES, ids=lambda c: "d{}-h{}-e{}-k{}-t{}-b{}-g{}".format(*c)
)
def test_moe_gate_up_and_down(metal, monkeypatch, case):
    dims, hidden, experts, top_k, tokens, bits, group_size = case
    block = _block(dims, hidden, experts, top_k, bits, group_size, seed=7 * tokens + bits)
    x = mx.random.normal((tokens, dims)).astype(mx.bfloat16)
    residual = mx.random.normal((tokens, dims)).astype(mx.bfloat16)
    indices, scores = _reference(monkeypatch, lambda: block.route(x))
    sw = block.switch_mlp
    assert kernels.experts_covered(sw, x, top_k)
    ref = _reference(monkeypatch, lambda: sw(x, indices, scores, residual=residual))
    # float32 truth: the same quantized weights, float32 activations and math
    sw32 = _block(dims, hidden, experts, top_k, bits, group_size, 7 * tokens + bits, mx.float32)
    f32 = [a.astype(mx.float32) for a in (x, scores, residual)]
    truth = _reference(
        monkeypatch, lambda: sw32.switch_mlp(f32[0], indices, f32[1], residual=f32[2])
    )
    out = kernels.moe_experts(sw, x, indices, scores, residual)
    assert _launched(metal, "moe_gate_up") == 1 and _launched(metal, "moe_down") == 1
    # gate+up alone, against dequantized float32 math
    (gate_launch, gate_bufs) = metal.launches[0]
    h = emulate.to_array(gate_bufs[-1], *gate_launch.outputs[0])
    idx = np.array(indices).reshape(-1)
    want_h = []
    for p, e in enumerate(idx.tolist()):
        gp, up = sw.gate_proj, sw.up_proj
        wg = mx.dequantize(gp.weight[e], gp.scales[e], gp.biases[e], group_size, bits)
        wu = mx.dequantize(up.weight[e], up.scales[e], up.biases[e], group_size, bits)
        xt = f32[0][p // top_k]
        want_h.append(nn.silu(xt @ wg.astype(mx.float32).T) * (xt @ wu.astype(mx.float32).T))
    want_h = mx.stack(want_h)
    err_h = rel_err(h, want_h)
    err, err_ref = rel_err(out, truth), rel_err(ref, truth)
    report("moe_experts", case=case, gate_up_rel=err_h, gate_up_max_abs=max_abs(h, want_h),
           out_rel=err, out_max_abs=max_abs(out, truth), reference_rel=err_ref)  # fmt: skip
    assert np.isfinite(f64(out)).all()
    assert err_h < 8e-3 and err <= max(1.5 * err_ref, 8e-3)


def _attention(
    seed: int, dims=256, heads=4, kv_heads=2, head_dim=64, bits=4, group_size=64, dtype=mx.bfloat16
):
    from qwen3_mlx.config import ModelArgs
    from qwen3_mlx.model import DecoderLayer

    mx.random.seed(seed)
    args = ModelArgs.from_dict(
        dict(model_type="qwen3", hidden_size=dims, num_hidden_layers=1,
             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
             vocab_size=64, intermediate_size=128)
    )  # fmt: skip
    layer = DecoderLayer(args, 0)
    nn.quantize(layer, group_size, bits)
    layer.set_dtype(mx.bfloat16)
    for norm in (layer.input_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm):
        norm.weight = (1 + 0.1 * mx.random.normal(norm.weight.shape)).astype(mx.bfloat16)
    layer.set_dtype(dtype)  # float32: the same bf16-valued parameters, for a float32 truth
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("seq, per_row", [(1, True), (2, False)])
def test_qk_norm_rope(metal, monkeypatch, seq, per_row):
    layer = _attention(seq)
    attn = layer.self_attn
    x = mx.random.normal((3, seq, 256)).astype(mx.bfloat16)
    offset = mx.array([5, 900, 30000], mx.int32) if per_row else mx.array(1234, mx.int32)
    ref = _reference(monkeypatch, lambda: attn.project(x, offset))
    out = attn.project(x, offset)
    assert _launched(metal, "qk_norm_rope") == 1
    errs = [rel_err(o, r) for o, r in zip(out, ref, strict=True)]
    report("qk_norm_rope", seq=seq, per_row=per_row, rel=errs,
           max_abs=[max_abs(o, r) for o, r in zip(out, ref, strict=True)])  # fmt: skip
    assert [o.shape for o in out] == [r.shape for r in ref]
    # same q/k/v projection (reference ops) on both paths: v is copied, q/k within bf16
    assert errs[2] == 0.0 and max(errs[:2]) < 1e-2


PROLOGUE_CASES = [
    # (bits, group_size, batch, seq, split)
    (4, 32, 3, 1, 1),
    (8, 64, 2, 2, 1),
    (4, 128, 1, 1, 2),  # the ticket hand-off of the CUDA build, here on the Metal sources
    (8, 32, 4, 1, 2),
]


@pytest.mark.parametrize("case", PROLOGUE_CASES, ids=lambda c: "b{}-g{}-B{}-L{}-split{}".format(*c))
def test_attn_prologue(metal, monkeypatch, case):
    bits, group_size, batch, seq, split = case
    if split > 1:  # Metal keeps one threadgroup per head (unvalidated hand-off); try it anyway
        monkeypatch.setattr(tuning, "SPLIT_BACKENDS", ("cuda", "metal"))
    layer = _attention(batch + bits, bits=bits, group_size=group_size)
    x = mx.random.normal((batch, seq, 256)).astype(mx.bfloat16)
    offset = mx.arange(batch, dtype=mx.int32) * 53 + 9
    ref = _reference(monkeypatch, lambda: layer.start(x, offset))
    layer32 = _attention(batch + bits, bits=bits, group_size=group_size, dtype=mx.float32)
    truth = _reference(monkeypatch, lambda: layer32.start(x.astype(mx.float32), offset))
    out = layer.start(x, offset)
    assert _launched(metal, "attn_prologue") == 1
    errs = [rel_err(o, r) for o, r in zip(out, truth, strict=True)]
    ref_errs = [rel_err(o, r) for o, r in zip(ref, truth, strict=True)]
    launch, bufs = metal.launches[-1]
    ticket_buf = next(i for i, (role, n) in enumerate(launch.buffers) if n == "tickets")
    counters = np.frombuffer(bufs[ticket_buf], np.uint32)
    report("attn_prologue", case=case, rel=errs, reference_rel=ref_errs,
           tickets=int(counters.sum()),
           max_abs=[max_abs(o, r) for o, r in zip(out, truth, strict=True)])  # fmt: skip
    assert [o.shape for o in out] == [r.shape for r in ref]
    # float32 truth (MLX's CPU bf16 quantized matmul, the reference path, is ~2% off)
    assert max(errs) < 1e-2
    if split > 1:  # every (token group, q/k head) counter advanced by the split
        groups = launch.grid[1]
        used = counters[: groups * 6]
        assert (used == split).all() and (counters[groups * 6 :] == 0).all()


@pytest.mark.parametrize(
    "heads, kv_heads, length, dtype",
    [
        (8, 2, 1, mx.bfloat16),
        (4, 2, 40, mx.float32),
        (8, 1, 100, mx.bfloat16),
        (2, 2, 70, mx.float16),
        (16, 1, 1030, mx.bfloat16),  # 32 splits (the most), 8 heads per threadgroup
    ],
)
def test_decode_attention(metal, heads, kv_heads, length, dtype):
    """Cache lengths of 1, 2, 4 and 3 splits; the keys/values are read as strided views of
    the cache's larger buffers; threadgroups run in shuffled order, so any may merge."""
    from mlx_lm.models.cache import KVCache

    batch, head_dim = (1 if length > 512 else 2), 128
    mx.random.seed(length)
    cache = KVCache()
    one = (batch, kv_heads, 1, head_dim)
    if length > 1:
        rest = (batch, kv_heads, length - 1, head_dim)
        cache.update_and_fetch(
            mx.random.normal(rest).astype(dtype), mx.random.normal(rest).astype(dtype)
        )
    keys, values = cache.update_and_fetch(  # views of buffers with room to spare
        mx.random.normal(one).astype(dtype), mx.random.normal(one).astype(dtype)
    )
    assert cache.keys.shape[2] > length
    q = (2 * mx.random.normal((batch, heads, 1, head_dim))).astype(dtype)

    class Owner:
        pass

    scale = head_dim**-0.5
    out = kernels.decode_attention(q, keys, values, scale, Owner())
    f32 = [a.astype(mx.float32) for a in (q, keys, values)]
    ref = mx.fast.scaled_dot_product_attention(*f32, scale=scale)
    err = rel_err(out, ref)
    launch, _ = metal.launches[-1]
    report("decode_attention", heads=heads, kv_heads=kv_heads, length=length, dtype=dtype,
           splits=kernels.attention_splits(length), threads=launch.threadgroup[0], rel=err,
           max_abs=max_abs(out, ref))  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype
    assert err < (1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_attention_row_starts(metal, dtype):
    """Rows that start at different columns (the server's left-padded batch): each attends to
    its own keys only, whether they fill every split, some, or one key of one split."""
    batch, heads, kv_heads, length, head_dim = 4, 8, 2, 70, 128  # 3 splits
    mx.random.seed(3)
    q = mx.random.normal((batch, heads, 1, head_dim)).astype(dtype)
    keys = mx.random.normal((batch, kv_heads, length, head_dim)).astype(dtype)
    values = mx.random.normal((batch, kv_heads, length, head_dim)).astype(dtype)
    starts = mx.array([0, 20, 60, length - 1], dtype=mx.int32)
    mask = (mx.arange(length)[None, :] >= starts[:, None])[:, None, None, :]

    class Owner:
        pass

    scale = head_dim**-0.5
    out = kernels.decode_attention(q, keys, values, scale, Owner(), starts)
    f32 = [a.astype(mx.float32) for a in (q, keys, values)]
    ref = mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)
    err = rel_err(out, ref)
    report("decode_attention_row_starts", dtype=dtype, rel=err, max_abs=max_abs(out, ref))
    assert err < (1e-5 if dtype == mx.float32 else 1e-2)
    # Each row on its own (its keys from its start, no mask) gives the same.
    for b in range(batch):
        s = starts[b].item()
        alone = mx.fast.scaled_dot_product_attention(
            f32[0][b : b + 1], f32[1][b : b + 1, :, s:], f32[2][b : b + 1, :, s:], scale=scale
        )
        assert max_abs(out[b : b + 1], alone) < (1e-5 if dtype == mx.float32 else 2e-2)


def test_server_batch_attends_through_row_starts(metal, monkeypatch):
    """The server's batch (slots of left-padded rows, a free slot among them) decodes with the
    attention kernel reading each slot's first column instead of a mask, and every row gets
    the logits of MLX's masked attention. (The hand-off is allowed on the emulator here; a
    real Metal GPU keeps MLX's attention, see NEEDS_SPLIT.)"""
    from types import SimpleNamespace

    from mlx_lm.models.cache import KVCache

    from qwen3_mlx.kernels.check import check_model
    from qwen3_mlx.server.batch import Batch, Row

    monkeypatch.setattr(tuning, "SPLIT_BACKENDS", ("metal", "cuda"))
    model = check_model(mx.float32)
    loaded = SimpleNamespace(model=model, max_kv_size=None)
    mx.random.seed(7)

    def logits_with(plan: KernelPlan) -> tuple[mx.array, int]:
        model.use_kernels(plan, compile="layer")
        _use(monkeypatch, plan)
        batch = Batch(loaded)
        for length in (40, 3, 17):
            row = Row.__new__(Row)
            row.cache = [KVCache() for _ in model.layers]
            prompt = mx.arange(1, length + 1)[None] % 500
            mx.eval(model(prompt, cache=row.cache))
            batch.add(row)
        batch.keep([0, 2])  # slot 1 is free now: it decodes a zero row
        batch.add(row_of(model, 9))
        steps = []
        for step in range(3):
            inputs = mx.array([5 + step, 6, 7], dtype=mx.int32)
            steps.append(batch.forward(inputs))
        mx.eval(steps)
        return mx.stack(steps), batch.slots.size

    def row_of(model, length):
        row = Row.__new__(Row)
        row.cache = [KVCache() for _ in model.layers]
        mx.eval(model(mx.arange(2, length + 2)[None], cache=row.cache))
        return row

    reference, size = logits_with(KernelPlan(backend="metal"))
    before = _launched(metal, "decode_attention")
    fused, _ = logits_with(KernelPlan(backend="metal", attention=True))
    assert size == 4
    assert _launched(metal, "decode_attention") - before == 3 * len(model.layers)
    err = rel_err(fused, reference)
    report("server_batch_row_starts", rel=err)
    assert err < 1e-5
    model.use_kernels(KernelPlan())


# ---------------------------------------------------------------------------------------------
# The emulation can fail


def test_a_broken_prelude_is_caught(metal, monkeypatch):
    """shuffle_xor mapped to simd_shuffle (lane m's value instead of lane ^ m's): the router's
    top-k picks go wrong, and the emulation says so."""
    prelude = (build.SOURCE_DIR / "prelude.metal.h").read_text()
    broken = prelude.replace("simd_shuffle_xor(v, ushort(m))", "simd_shuffle(v, ushort(m))")
    assert broken.count("simd_shuffle(v, ushort(m))") == 2
    dims, experts, top_k, tokens = 256, 32, 4, 2
    block = _block(dims, 128, experts, top_k, 4, 64, seed=3)
    x = (2 * mx.random.normal((tokens, 1, dims))).astype(mx.bfloat16)
    good = kernels.moe_router(x, block.gate, top_k, True)
    with kernels.launched_by(emulate.Emulator(seed=1, prelude=broken), "metal"):
        bad = kernels.moe_router(x, block.gate, top_k, True)
    ref_idx, _ = _reference(monkeypatch, lambda: block.route(x))
    same = lambda a: [set(r) for r in np.array(a).reshape(tokens, -1).tolist()]  # noqa: E731
    assert same(good[0]) == same(ref_idx)
    assert same(bad[0]) != same(ref_idx)


def test_strict_address_spaces_catch_a_wrong_pointer():
    """The type check is strict: a prelude whose take_ticket wants a threadgroup pointer
    (the kernels pass it a device one) does not compile, as it would not under Metal."""
    prelude = (build.SOURCE_DIR / "prelude.metal.h").read_text()
    broken = prelude.replace(
        "take_ticket(const device uint32_t* counter",
        "take_ticket(const threadgroup uint32_t* counter",
    )
    assert broken != prelude
    x = mx.zeros((1, 256), mx.bfloat16)
    args = dict(
        name="moe_router",
        inputs=[x, mx.zeros((8, 32), mx.uint32), mx.ones((8, 4), mx.bfloat16),
                mx.zeros((8, 4), mx.bfloat16), mx.zeros((8,), mx.bfloat16),
                mx.zeros((4096,), mx.uint32)],
        template=[("T", mx.bfloat16), ("S", mx.bfloat16), ("E", 8), ("K", 256), ("GS", 64),
                  ("BITS", 4), ("TOPK", 2), ("NORM", True), ("NORM_IN", False), ("EPS_BITS", 0),
                  ("NT", 64), ("SPLIT", 1)],
        grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(1, 2), (1, 2), (1,), (1, 8)],
        output_dtypes=[mx.uint32, mx.float32, mx.bfloat16, mx.float32],
    )  # fmt: skip
    emulate.check_strict(emulate.strict_variant({**args, "prelude": None}))
    with pytest.raises(emulate.EmulationError, match="address space|cannot initialize|no matching"):
        emulate.check_strict(emulate.strict_variant({**args, "prelude": broken}))

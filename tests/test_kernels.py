"""Fused kernels: dispatch, the reference path against float64, kernels against the reference.

CPU part (CI): the switches (KernelOptions) and the plan they give (plan_for, Model.use_kernels),
the fallback, shared kernel sources, the gather_qmm reference against a float64 numpy reference,
compiled decode and fused projections against the plain model.
GPU part (`-m gpu`, run on the H200 through MLX's CUDA backend; results committed under
benchmarks/results/): every kernel against the reference within bf16 rounding for bits {4, 8},
group sizes {32, 64, 128}, 1-32 tokens and several expert counts / top-k, and whole-model
logits with kernels on vs off. The kernel side of each comparison runs under a plan that forces
its kernels (never "auto", which would compare the reference with itself where a kernel has not
passed its check) and asserts that they launched. Set QWEN3_MLX_KERNEL_REPORT=path to log the
measured errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen3_mlx import kernels
from qwen3_mlx.errors import ConfigError
from qwen3_mlx.kernels import OFF, KernelOptions, KernelPlan, build, tuning
from qwen3_mlx.kernels import attention as attention_kernels
from qwen3_mlx.kernels import moe as moe_kernels
from qwen3_mlx.kernels.options import FLAG_KERNELS
from qwen3_mlx.moe import SparseMoeBlock

gpu = pytest.mark.skipif(kernels.backend() is None, reason="needs MLX's Metal or CUDA backend")


def forced(**flags) -> KernelPlan:
    """A plan with these call sites' kernels on (unchecked), on this device's backend."""
    return KernelPlan(backend=kernels.backend(), **flags)


def every_kernel() -> KernelPlan:
    """Every kernel forced on (kernels="1"): a ConfigError without Metal/CUDA."""
    return kernels.plan_for(KernelOptions(kernels="1"))


@contextlib.contextmanager
def counted_launches():
    """Within the block, kernel launches still run on this device and are counted by name."""
    counts: Counter[str] = Counter()

    def launch(name, **kwargs):
        counts[name] += 1
        return build.mlx_launch(name, **kwargs)

    with kernels.launched_by(launch, kernels.backend()):
        yield counts


def refuse_launch(name, **_):
    raise AssertionError(f"{name} launched: only launch shapes were asked for")


def report(test: str, **values) -> None:
    path = os.environ.get("QWEN3_MLX_KERNEL_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **values}, default=float) + "\n")


def rel_err(out, ref) -> float:
    if isinstance(out, mx.array):
        out = np.array(out.astype(mx.float32))
    out = np.asarray(out, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def dequantize64(w, scales, biases, group_size: int, bits: int) -> np.ndarray:
    """MLX affine weights → float64 (values packed lowest bits first)."""
    w = np.array(w).astype(np.uint64)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None]
    q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], -1)
    s = np.array(scales.astype(mx.float32), dtype=np.float64).repeat(group_size, axis=-1)
    b = np.array(biases.astype(mx.float32), dtype=np.float64).repeat(group_size, axis=-1)
    return s * q + b


def make_block(dims, hidden, num_experts, top_k, bits, group_size, dtype, seed=0):
    mx.random.seed(seed)
    block = SparseMoeBlock(dims, hidden, num_experts, top_k, norm_topk_prob=True)
    block.gate.weight = block.gate.weight * 8  # spread the router's logits
    nn.quantize(block, group_size, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    if dtype != mx.float32:
        block.set_dtype(dtype)
    mx.eval(block.parameters())
    return block


def _unflatten(params):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(params.items()))


def experts64(block, x, indices, scores) -> np.ndarray:
    """Float64 routing-weighted sum of SwiGLU experts (dequantizing only the routed ones)."""
    sw = block.switch_mlp
    x = np.array(x.astype(mx.float32), dtype=np.float64).reshape(-1, x.shape[-1])
    idx = np.array(indices).reshape(x.shape[0], -1)
    sc = np.array(scores.astype(mx.float32), dtype=np.float64).reshape(x.shape[0], -1)
    weights = {}
    for e in np.unique(idx):
        e = int(e)
        weights[e] = [
            dequantize64(p.weight[e], p.scales[e], p.biases[e], p.group_size, p.bits)
            for p in (sw.gate_proj, sw.up_proj, sw.down_proj)
        ]
    out = np.zeros((x.shape[0], weights[int(idx[0, 0])][2].shape[0]))
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t]):
            gate, up, down = weights[int(e)]
            g, u = gate @ x[t], up @ x[t]
            out[t] += sc[t, j] * (down @ (g / (1 + np.exp(-g)) * u))
    return out


# ---------------------------------------------------------------------------------------------
# CPU: switches, sources, reference path


def test_switches(monkeypatch):
    """The environment's switches, parsed once into KernelOptions."""
    assert KernelOptions.from_env({}) == KernelOptions()  # all "auto", the layout too
    with pytest.raises(ConfigError, match="QWEN3_MLX_KERNELS"):
        KernelOptions.from_env({"QWEN3_MLX_KERNELS": "sometimes"})
    options = KernelOptions.from_env({"QWEN3_MLX_KERNELS": "0", "QWEN3_MLX_MOE_KERNELS": "auto"})
    assert (options.kernels, options.moe, options.router, options.attention) == (
        "0", "auto", True, True,
    )  # fmt: skip
    assert KernelOptions.from_env({"QWEN3_MLX_KERNELS": " AUTO "}).kernels == "auto"
    assert KernelOptions.from_env({"QWEN3_MLX_MOE_KERNELS": "1"}).moe == "1"
    assert not KernelOptions.from_env({"QWEN3_MLX_ROUTER_KERNEL": "0"}).router
    assert not KernelOptions.from_env({"QWEN3_MLX_ATTENTION_KERNEL": "0"}).attention
    with pytest.raises(ConfigError, match="QWEN3_MLX_ROUTER_KERNEL"):
        KernelOptions.from_env({"QWEN3_MLX_ROUTER_KERNEL": "yes"})
    with pytest.raises(ConfigError, match="QWEN3_MLX_ATTENTION_KERNEL"):
        KernelOptions.from_env({"QWEN3_MLX_ATTENTION_KERNEL": "off"})
    assert KernelOptions.from_env({"QWEN3_MLX_MOE_PREFILL": "Blocked"}).moe_prefill == "blocked"
    with pytest.raises(ConfigError, match="QWEN3_MLX_MOE_PREFILL"):
        KernelOptions.from_env({"QWEN3_MLX_MOE_PREFILL": "sideways"})
    # What load(..., kernels=...) and Model.use_kernels take.
    monkeypatch.setenv("QWEN3_MLX_KERNELS", "0")
    monkeypatch.setenv("QWEN3_MLX_ROUTER_KERNEL", "0")
    assert KernelOptions.of(None) == KernelOptions(kernels="0", router=False)
    assert KernelOptions.of("1") == KernelOptions(kernels="1")
    assert KernelOptions.of(True).kernels == "1" and KernelOptions.of(False).kernels == "0"
    assert KernelOptions.of({"moe": "0", "attention": False}) == KernelOptions(
        moe="0", attention=False
    )
    options = KernelOptions(kernels="auto", moe="1")
    assert KernelOptions.of(options) is options
    with pytest.raises(ConfigError, match="kernels"):
        KernelOptions.of("sometimes")
    with pytest.raises(ConfigError, match="moe_prefill"):
        KernelOptions(moe_prefill="sideways")


def test_plan_follows_the_switches_and_the_check():
    """plan_for: "1" turns a call site on unchecked, "0" off, "auto" asks the check (once, and
    only under "auto"); the MoE switch overrides the general one for the router and experts;
    router / attention off take those call sites off whatever the rest."""
    asked = []

    def check(backend):
        asked.append(backend)
        return {"rope", "router", "attention"}

    with kernels.launched_by(refuse_launch, "cuda"):  # a GPU backend, nothing launched
        plan = kernels.plan_for(KernelOptions(), check=check)
        assert asked == ["cuda"]
        assert plan == KernelPlan(backend="cuda", rope=True, router=True, attention=True)
        assert plan.any and plan.kernels() == ["decode_attention", "moe_router", "qk_norm_rope"]
        everything = kernels.plan_for(KernelOptions(kernels="1"), check=check)
        assert asked == ["cuda"]  # forced: not asked
        assert all(getattr(everything, flag) for flag in FLAG_KERNELS)
        assert everything.kernels() == sorted({k for ks in FLAG_KERNELS.values() for k in ks})
        nothing = kernels.plan_for(KernelOptions(kernels="0"), check=check)
        assert nothing == KernelPlan(backend="cuda") and not nothing.any
        assert asked == ["cuda"]
        moe_only = kernels.plan_for(KernelOptions(kernels="0", moe="auto"), check=check)
        assert moe_only == KernelPlan(backend="cuda", router=True)  # experts did not pass
        assert len(asked) == 2
        no_moe = kernels.plan_for(KernelOptions(kernels="1", moe="0"), check=check)
        assert no_moe == everything.without("router", "experts")
        trimmed = kernels.plan_for(
            KernelOptions(kernels="1", router=False, attention=False, moe_prefill="per-pair"),
            check=check,
        )
        assert trimmed == replace(everything.without("router", "attention"), moe_prefill="per-pair")
    with kernels.launched_by(refuse_launch, "metal"):
        assert kernels.plan_for(KernelOptions(), check=lambda b: {"norm"}).backend == "metal"
    with mx.stream(mx.cpu):  # no GPU backend: nothing to check, nothing may be forced
        assert kernels.backend() is None
        plan = kernels.plan_for(KernelOptions(moe_prefill="blocked"), check=check)
        assert plan == KernelPlan(moe_prefill="blocked") and not plan.any and len(asked) == 2
        for options in (KernelOptions(kernels="1"), KernelOptions(kernels="0", moe="1")):
            with pytest.raises(ConfigError, match="forced on"):
                kernels.plan_for(options, check=check)
        off = KernelOptions(kernels="0", moe="1", router=False, attention=False)
        with pytest.raises(ConfigError, match="forced on"):
            kernels.plan_for(off, check=check)  # the experts still are
    assert OFF == KernelPlan() and not OFF.any and OFF.kernels() == []


def test_use_kernels_hands_one_plan_to_every_layer():
    """Model.use_kernels: a KernelPlan as is, to the model and each module that reads one
    (MoE blocks and their experts too); the compile switch beside it; each call forgets the
    compiled steps (they bake in which kernels run)."""
    model, _ = tiny_model()
    readers = [m for _, m in model.named_modules() if hasattr(type(m), "kernel_plan")]
    assert {type(m).__name__ for m in readers} >= {
        "Model", "Qwen3Model", "DecoderLayer", "Attention", "SparseMoeBlock", "Experts",
    }  # fmt: skip
    plan = KernelPlan(backend="cuda", rope=True, moe_prefill="blocked")
    assert model.use_kernels(plan, compile="layer") is plan
    assert all(m.kernel_plan is plan for m in readers)
    assert model.model.compile_mode == "layer"
    object.__setattr__(model.model, "_compiled", ("stale", None))
    assert model.use_kernels("0", compile=False) == KernelPlan(backend=kernels.backend())
    assert all(m.kernel_plan == model.kernel_plan for m in readers)
    assert model.model.compile_mode == "0" and "_compiled" not in model.model.__dict__
    model.use_kernels(OFF)  # compile=None: unchanged
    assert model.model.compile_mode == "0" and model.kernel_plan is OFF
    assert model.use_kernels({"kernels": "0", "moe_prefill": "per-pair"}).moe_prefill == "per-pair"
    with pytest.raises(ConfigError, match="compile"):
        model.use_kernels(OFF, compile="sometimes")
    for value, mode in [("1", "1"), ("auto", "auto"), (" Layer", "layer"), (True, "1")]:
        model.use_kernels(OFF, compile=value)
        assert model.model.compile_mode == mode


def test_cpu_falls_back_to_reference():
    block = make_block(64, 32, 8, 2, 4, 32, mx.float32)
    x = mx.random.normal((2, 3, 64))
    with mx.stream(mx.cpu):
        assert kernels.backend() is None
        plan = kernels.plan_for(KernelOptions(moe="auto"))  # no GPU: nothing runs, unchecked
        assert plan == OFF
        kernels.use_plan(block, plan)
        auto = block(x)
        indices, scores = block.route(x)
        reference = block.switch_mlp.reference(x, indices, scores)
        np.testing.assert_allclose(np.array(auto), np.array(reference), atol=1e-6)
        with pytest.raises(ConfigError, match="forced on"):
            kernels.plan_for(KernelOptions(moe="1"))
        model, _ = tiny_model()
        with pytest.raises(ConfigError, match="forced on"):
            model.use_kernels("1")


def test_split_launch_shapes():
    """On CUDA the router spreads a token over 8 threadgroups and the prologue a head over 4,
    each within the register budget their loads-in-flight design assumes (<= 256 threads);
    elsewhere (Metal: the hand-off is unvalidated) they keep one threadgroup each."""
    router_shape, prologue_shape = moe_kernels._router_shape, attention_kernels._prologue_shape
    with kernels.launched_by(refuse_launch, "metal"):
        assert router_shape(128) == (1, 256) and prologue_shape(128) == (1, 256)
    with kernels.launched_by(refuse_launch, "cuda"):
        assert router_shape(128) == (8, 128)
        assert router_shape(64) == (8, 64)
        assert router_shape(16)[0] == 8
        assert prologue_shape(128) == (4, 256)
        assert prologue_shape(64) == (2, 256)
        split, threads = router_shape(60)
        assert 60 % split == 0 and threads <= 256


def test_sources_share_one_body_per_kernel():
    import tomllib
    from pathlib import Path

    for name in kernels.SPECS:
        metal_header, metal_body = kernels.kernel_source(name, "metal")
        cuda_header, cuda_body = kernels.kernel_source(name, "cuda")
        body = (build.SOURCE_DIR / f"{name}.inc").read_text()
        assert metal_body.endswith(body) and cuda_body.endswith(body)
        assert "threadIdx" in cuda_body and "thread_index_in_threadgroup" in metal_body
        assert "uint " not in cuda_body + cuda_header  # CUDA has no Metal `uint`
        # Without comments (comments=False): the same code, line for line.
        for backend_name in ("cuda", "metal"):
            for full, bare in zip(kernels.kernel_source(name, backend_name),
                                  kernels.kernel_source(name, backend_name, comments=False),
                                  strict=True):  # fmt: skip
                code = [line.split("//")[0].rstrip() for line in full.splitlines()]
                assert [line for line in code if line.strip()] == bare.strip("\n").splitlines()
                assert len(bare) < 0.8 * len(full)
    # Both preludes define the same vocabulary (macros and helper functions) for the bodies.
    vocab = {}
    for backend_name in ("cuda", "metal"):
        text = (build.SOURCE_DIR / f"prelude.{backend_name}.h").read_text()
        macros = re.findall(r"^#define (\w+)", text, re.M)
        helpers = re.findall(r"^DEVICE_FN [\w ]+? (\w+)\(", text, re.M)
        vocab[backend_name] = set(macros) | set(helpers)
    assert vocab["cuda"] == vocab["metal"] | {"popcount"}  # a Metal built-in
    assert {"take_ticket", "DEVICE_FENCE", "load_coherent", "warp_max"} <= vocab["cuda"]
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["qwen3_mlx"]
    assert any(pattern.startswith("kernel_sources/") for pattern in data)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 9])  # 9 tokens x top-8 = 72 pairs: the sorted path
@pytest.mark.parametrize("layout", ["per-pair", "blocked"])
def test_reference_experts_match_float64(bits, group_size, tokens, layout):
    from qwen3_mlx.moe import prefill_layout

    block = make_block(128, 128, 16, 8, bits, group_size, mx.float32, seed=bits + tokens)
    block.switch_mlp.kernel_plan = KernelPlan(moe_prefill=layout)
    assert prefill_layout(tokens * 8, 16, block.switch_mlp.kernel_plan) == layout
    x = mx.random.normal((tokens, 128))
    with mx.stream(mx.cpu):
        indices, scores = block.route(x)
        out = block.switch_mlp.reference(x, indices, scores)
    assert rel_err(out, experts64(block, x, indices, scores)) < 1e-5


@pytest.mark.parametrize("rows", [None, 16, 64])
@pytest.mark.parametrize("quantized", [True, False])
def test_blocked_prefill_layout_matches_per_pair(rows, quantized):
    """Pairs packed into per-expert blocks (prefill on CUDA) give the per-pair result, with
    experts that get no token, one token, and more tokens than a block holds."""
    from qwen3_mlx.moe import Experts

    mx.random.seed(3)
    experts = Experts(64, 32, 8)
    if quantized:
        nn.quantize(experts, 32, 4)
    tokens, k = 70, 2
    x = mx.random.normal((1, tokens, 64))
    first = mx.concatenate([mx.zeros((60,), mx.uint32), mx.full((10,), 5, mx.uint32)])
    indices = mx.stack([first, mx.full((tokens,), 3, mx.uint32)], axis=-1)[None]
    indices[0, 7, 1] = 6  # expert 6: a single pair; experts 1, 2, 4 and 7: none
    scores = mx.softmax(mx.random.normal((1, tokens, k)), axis=-1)
    with mx.stream(mx.cpu):
        want = experts.per_pair(x, indices, scores)
        got = experts.blocked(x, indices, scores, rows)
    assert got.shape == want.shape == (1, tokens, 64)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_prefill_layout_switch():
    """The plan's layout: auto packs blocks on CUDA once there is a pair per expert."""
    from qwen3_mlx.moe import prefill_layout

    with pytest.raises(ConfigError, match="QWEN3_MLX_MOE_PREFILL"):
        KernelOptions.from_env({"QWEN3_MLX_MOE_PREFILL": "sideways"})
    plan = kernels.plan_for(KernelOptions(kernels="0"))  # this device's, nothing to check
    assert plan.backend == kernels.backend() and plan.moe_prefill == "auto"
    cuda = kernels.backend() == "cuda"
    assert prefill_layout(1024, 128, plan) == ("blocked" if cuda else "per-pair")
    assert prefill_layout(64, 128, plan) == "per-pair"
    assert prefill_layout(1024, 128, KernelPlan(backend="cuda")) == "blocked"
    assert prefill_layout(127, 128, KernelPlan(backend="cuda")) == "per-pair"
    for backend in (None, "metal"):
        assert prefill_layout(1024, 128, KernelPlan(backend=backend)) == "per-pair"
    forced_layout = kernels.plan_for(KernelOptions(kernels="0", moe_prefill="blocked"))
    assert prefill_layout(64, 128, forced_layout) == "blocked"
    per_pair = KernelPlan(backend="cuda", moe_prefill="per-pair")
    assert prefill_layout(1024, 128, per_pair) == "per-pair"


def tiny_model(
    dtype=mx.float32, bits=4, group_size=64, seed=0, dense=False, tied=False, head_dim=None
):
    from benchmarks.models import PRESETS, random_weights, skeleton

    config = dict(PRESETS["tiny"], num_hidden_layers=2, vocab_size=512, tie_word_embeddings=tied)
    if head_dim:
        config.update(head_dim=head_dim)
    if dense:
        config.update(model_type="qwen3", num_experts=0, intermediate_size=512)
    model = skeleton("ours", config, bits, group_size)
    model.update(_unflatten(random_weights(model, seed, dtype=dtype)))
    model.eval()
    return model, config


def run_tokens(model, tokens: np.ndarray, steps: int) -> np.ndarray:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = len(tokens[0]) - steps
    outs = [model(mx.array(tokens[:, :prompt]), cache)]
    for i in range(prompt, prompt + steps):
        outs.append(model(mx.array(tokens[:, i : i + 1]), cache))
    return np.concatenate([np.array(o.astype(mx.float32)) for o in outs], axis=1)


def test_compiled_decode_and_fused_projections_match_plain_model():
    model, _ = tiny_model()
    plan = model.kernel_plan  # the same kernels compiled and not
    names_before = {k: v.shape for k, v in tree_flatten(model.parameters())}
    q_before = np.array(model.layers[0].self_attn.q_proj.scales)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 12))
    model.use_kernels(plan, compile="layer")
    compiled = run_tokens(model, tokens, steps=5)
    assert model.model.__dict__.get("_compiled") is not None
    model.use_kernels(plan, compile="0")
    plain = run_tokens(model, tokens, steps=5)
    assert "_compiled" not in model.model.__dict__
    np.testing.assert_allclose(compiled, plain, atol=1e-4, rtol=1e-4)
    # Fusing kept names, shapes and values of the parameters.
    assert {k: v.shape for k, v in tree_flatten(model.parameters())} == names_before
    np.testing.assert_array_equal(np.array(model.layers[0].self_attn.q_proj.scales), q_before)
    # New weights after a forward: the fused projections and compiled steps follow them.
    from benchmarks.models import random_weights

    model.update(_unflatten(random_weights(model, seed=1)))
    model.use_kernels(plan, compile="layer")
    compiled_new = run_tokens(model, tokens, steps=5)
    assert model.model.__dict__.get("_compiled") is not None
    model.use_kernels(plan, compile="0")
    plain_new = run_tokens(model, tokens, steps=5)
    np.testing.assert_allclose(compiled_new, plain_new, atol=1e-4, rtol=1e-4)
    assert np.abs(plain_new - plain).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# GPU: kernels against the reference

EXPERT_CASES = [
    # (dims, hidden, experts, top_k, tokens, bits, group_size)
    *[(512, 256, 64, 8, t, b, g) for b in (4, 8) for g in (32, 64, 128) for t in (1, 7)],
    (2048, 768, 128, 8, 1, 4, 64),  # Qwen3-30B-A3B
    (2048, 768, 128, 8, 32, 4, 64),
    (512, 256, 16, 4, 3, 8, 128),
    (256, 128, 8, 2, 16, 4, 32),
    (4096, 1536, 16, 8, 2, 4, 64),  # Qwen3-235B-A22B widths (16 of its 128 experts)
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "case", EXPERT_CASES, ids=lambda c: "d{}-h{}-e{}-k{}-t{}-b{}-g{}".format(*c)
)
def test_expert_kernels_match_reference(case):
    dims, hidden, num_experts, top_k, tokens, bits, group_size = case
    block = make_block(dims, hidden, num_experts, top_k, bits, group_size, mx.bfloat16, seed=tokens)
    x = mx.random.normal((tokens, dims)).astype(mx.bfloat16)
    residual = mx.random.normal((tokens, dims)).astype(mx.bfloat16)
    indices, scores = block.route(x)  # one routing for both paths
    sw = block.switch_mlp
    assert kernels.experts_covered(sw, x, top_k)
    exact = experts64(block, x, indices, scores)
    sw.kernel_plan = OFF
    reference = sw(x, indices, scores)
    sw.kernel_plan = forced(experts=True)
    with counted_launches() as launches:
        out = sw(x, indices, scores)
        out_res = sw(x, indices, scores, residual=residual)
    assert launches == {"moe_gate_up": 2, "moe_down": 2}, launches
    err_kernel, err_ref = rel_err(out, exact), rel_err(reference, exact)
    res64 = np.array(residual.astype(mx.float32), dtype=np.float64)
    err_res = rel_err(out_res, exact + res64)
    report("experts", case=case, kernel=err_kernel, reference=err_ref, with_residual=err_res)
    assert np.isfinite(np.array(out.astype(mx.float32))).all()
    assert err_kernel <= max(1.5 * err_ref, 4e-3)
    assert err_res <= 8e-3


ROUTER_CASES = [
    *[(512, 64, 8, 3, b, g) for b in (4, 8) for g in (32, 64, 128)],
    (2048, 128, 8, 1, 8, 64),  # Qwen3-30B-A3B's router
    (2048, 128, 8, 32, 8, 64),
    (4096, 128, 8, 2, 8, 64),  # Qwen3-235B-A22B's router
    (256, 16, 4, 5, 4, 32),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "d{}-e{}-k{}-t{}-b{}-g{}".format(*c))
def test_router_kernel_matches_reference(case, normalize):
    dims, num_experts, top_k, tokens, bits, group_size = case
    block = make_block(dims, 128, num_experts, top_k, bits, group_size, mx.bfloat16, seed=tokens)
    block.norm_topk_prob = normalize
    x = mx.random.normal((tokens, dims)).astype(mx.bfloat16)
    block.kernel_plan = OFF
    ref_idx, ref_scores = block.route(x)
    logits = np.array(block.gate(x).astype(mx.float32))
    gate = block.gate
    exact = (
        np.array(x.astype(mx.float32), np.float64)
        @ dequantize64(gate.weight, gate.scales, gate.biases, gate.group_size, gate.bits).T
    )
    block.kernel_plan = forced(router=True)
    with counted_launches() as launches:
        idx, scores = block.route(x)
    assert launches == {"moe_router": 1}, launches
    assert idx.dtype == mx.uint32 and idx.shape == (tokens, top_k)
    ref_idx, idx = np.array(ref_idx), np.array(idx)
    ref_scores = np.array(ref_scores.astype(mx.float32))
    scores = np.array(scores.astype(mx.float32))
    compared, worst, worst_ref = 0, 0.0, 0.0
    for t in range(tokens):
        ordered = np.sort(exact[t])[::-1]
        # Both paths round the logits to bf16 (~3 significant digits) after summing in a
        # different order: near the cut either expert is a correct choice.
        if ordered[top_k - 1] - ordered[top_k] < 2e-2 * max(1.0, abs(ordered[top_k - 1])):
            continue
        assert set(idx[t].tolist()) == set(ref_idx[t].tolist()), (t, idx[t], ref_idx[t])
        assert np.all(np.diff(logits[t][idx[t]]) <= 1e-2 * np.abs(logits[t]).max()), logits[t][
            idx[t]
        ]
        # Scores against float64 softmax of the exact logits. Both paths round the logits to
        # bf16 (relative error <= 2^-8), so a score may be off by up to exp(2 * 2^-8 * |l|max).
        probs = np.exp(exact[t] - exact[t].max())
        probs /= probs.sum()
        want = probs[idx[t]] / (probs[idx[t]].sum() if normalize else 1.0)
        err = np.abs(scores[t] - want) / want
        ref_want = probs[ref_idx[t]] / (probs[ref_idx[t]].sum() if normalize else 1.0)
        ref_err = np.abs(ref_scores[t] - ref_want) / ref_want
        bound = np.exp(2 * 2.0**-8 * np.abs(exact[t]).max()) - 1 + 1e-3
        assert err.max() <= bound, (t, err, bound)
        worst = max(worst, float(err.max()))
        worst_ref = max(worst_ref, float(ref_err.max()))
        compared += 1
    report("router", case=case, normalize=normalize, tokens_compared=compared, max_rel=worst,
           reference_max_rel=worst_ref)  # fmt: skip
    assert compared >= tokens // 4  # a lone token may sit at a near-tie


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 8])
def test_router_kernel_hands_on_the_normalised_input(tokens):
    """With a norm, the router normalises x itself and returns norm(x) for the experts: it must
    be exactly what the reference RMSNorm gives (both round the product to bf16 once)."""
    dims = 2048
    block = make_block(dims, 128, 128, 8, 4, 64, mx.bfloat16, seed=tokens)
    norm = nn.RMSNorm(dims, eps=1e-6)
    norm.weight = (1 + 0.1 * mx.random.normal((dims,))).astype(mx.bfloat16)
    x = (3 * mx.random.normal((tokens, 1, dims))).astype(mx.bfloat16)
    idx, _, normed = kernels.moe_router(x, block.gate, 8, True, norm=norm)
    want = norm(x)
    assert normed.shape == x.shape and normed.dtype == x.dtype
    diff = np.abs(np.array(normed.astype(mx.float32)) - np.array(want.astype(mx.float32)))
    scale = np.abs(np.array(want.astype(mx.float32))) + 1e-3
    report("router_norm", tokens=tokens, max_rel=float((diff / scale).max()))
    assert (diff / scale).max() <= 2.0**-7  # at most one bf16 rounding step apart
    assert idx.shape == (tokens, 1, 8)


def _wide_layer(n_heads: int):
    """A quantized bf16 dense decoder layer of width 2048 (4 kv heads of 128), q/k norms set."""
    from qwen3_mlx.config import ModelArgs
    from qwen3_mlx.model import DecoderLayer

    args = ModelArgs.from_dict(
        dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=1,
             num_attention_heads=n_heads, num_key_value_heads=4, head_dim=128, vocab_size=64,
             intermediate_size=256)
    )  # fmt: skip
    layer = DecoderLayer(args, 0)
    nn.quantize(layer, 64, 4)
    layer.set_dtype(mx.bfloat16)
    for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
        norm.weight = (1 + 0.1 * mx.random.normal((128,))).astype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 8, 32])
def test_split_router_equals_one_threadgroup_per_token(tokens, monkeypatch):
    """Spreading a token's logits over threadgroups (the last one picks) changes nothing: each
    logit is summed by one warp in the same order either way, so the results are bitwise
    equal; the arrival counters advance by the split per launch and token."""
    block = make_block(2048, 128, 128, 8, 8, 64, mx.bfloat16, seed=tokens)
    norm = nn.RMSNorm(2048, eps=1e-6)
    x = mx.random.normal((tokens, 1, 2048)).astype(mx.bfloat16)
    monkeypatch.setattr(tuning, "ROUTER_SPLIT", 1)
    want = kernels.moe_router(x, block.gate, 8, True, norm=norm)
    mx.eval(want)
    monkeypatch.setattr(tuning, "ROUTER_SPLIT", 8)
    counters = kernels.tickets(block.gate)
    before = np.array(counters)
    for _ in range(3):  # the counters keep counting; each launch must still pick correctly
        got = kernels.moe_router(x, block.gate, 8, True, norm=norm)
        mx.eval(got)
        for g, w in zip(got, want, strict=True):
            assert mx.array_equal(g, w).item()
    advanced = np.array(counters).astype(np.int64) - before
    assert (advanced[:tokens] == 3 * 8).all() and (advanced[tokens:] == 0).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 7])
def test_split_prologue_equals_one_threadgroup_per_head(tokens, monkeypatch):
    """A head's rows over several threadgroups (the last normalises and rotates the head)
    gives bitwise the same q, k, v as one threadgroup per head, launch after launch."""
    mx.random.seed(tokens)
    layer = _wide_layer(n_heads=32)
    x = mx.random.normal((tokens, 1, 2048)).astype(mx.bfloat16)
    offset = mx.arange(tokens, dtype=mx.int32) * 53 + 9
    kernels.use_plan(layer, every_kernel())
    monkeypatch.setattr(tuning, "PROLOGUE_SPLIT", 1)
    with counted_launches() as launches:
        want = layer.start(x, offset)
        mx.eval(want)
    assert launches == {"attn_prologue": 1}, launches
    monkeypatch.setattr(tuning, "PROLOGUE_SPLIT", 4)
    assert attention_kernels._prologue_shape(128)[0] == (4 if kernels.backend() == "cuda" else 1)
    for _ in range(3):
        with counted_launches() as launches:
            got = layer.start(x, offset)
            mx.eval(got)
        assert launches == {"attn_prologue": 1}, launches
        for g, w in zip(got, want, strict=True):
            assert mx.array_equal(g, w).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seq", [1, 5])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("yarn", [False, True])
def test_qk_norm_rope_kernel_matches_reference(seq, per_row, yarn):
    from qwen3_mlx.config import ModelArgs
    from qwen3_mlx.model import Attention

    args = ModelArgs.from_dict(
        dict(
            model_type="qwen3", hidden_size=512, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2, head_dim=128, vocab_size=64, intermediate_size=64,
            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 4096} if yarn else None,
        )
    )  # fmt: skip
    attn = Attention(args)
    nn.quantize(attn, 64, 4)
    attn.set_dtype(mx.bfloat16)
    attn.q_norm.weight = (1 + 0.1 * mx.random.normal((128,))).astype(mx.bfloat16)
    mx.eval(attn.parameters())
    batch = 3
    x = mx.random.normal((batch, seq, 512)).astype(mx.bfloat16)
    offset = mx.array([5, 900, 30000], dtype=mx.int32) if per_row else 1234
    attn.kernel_plan = OFF
    with counted_launches() as launches:
        ref = attn.project(x, offset)
        mx.eval(ref)
    assert not launches, launches
    # Forced on: under "auto" a device where the kernel has not passed its check would
    # compare the reference with itself.
    attn.kernel_plan = forced(rope=True)
    with counted_launches() as launches:
        out = attn.project(x, offset)
        mx.eval(out)
    assert launches == {"qk_norm_rope": 1}, f"the kernel did not run: {launches}"
    errs = [
        rel_err(o, np.array(r.astype(mx.float32), dtype=np.float64))
        for o, r in zip(out, ref, strict=True)
    ]
    report("qk_norm_rope", seq=seq, per_row=per_row, yarn=yarn, q=errs[0], k=errs[1], v=errs[2])
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape
    assert errs[2] == 0.0 and max(errs[:2]) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dims", [256, 2048, 4096])
def test_add_rms_norm_kernel_matches_reference(dims):
    a = mx.random.normal((5, dims)).astype(mx.bfloat16)
    b = mx.random.normal((5, dims)).astype(mx.bfloat16)
    w = (1 + 0.1 * mx.random.normal((dims,))).astype(mx.bfloat16)
    s, n = kernels.add_rms_norm(a, b, w, 1e-6)
    ref_s = a + b
    ref_n = mx.fast.rms_norm(ref_s, w, 1e-6)
    assert mx.array_equal(s, ref_s).item()
    err = rel_err(n, np.array(ref_n.astype(mx.float32), dtype=np.float64))
    report("add_rms_norm", dims=dims, rel=err)
    assert err < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [1, 3, 8, 13])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_linear_kernel_matches_reference(tokens, bits, group_size):
    """The few-token quantized linear (o_proj, dense down, lm_head), with and without residual."""
    lin = nn.QuantizedLinear(1024, 520, bias=False, group_size=group_size, bits=bits)
    lin.set_dtype(mx.bfloat16)
    mx.eval(lin.parameters())
    x = mx.random.normal((tokens, 1024)).astype(mx.bfloat16)
    res = mx.random.normal((tokens, 520)).astype(mx.bfloat16)
    w64 = dequantize64(lin.weight, lin.scales, lin.biases, group_size, bits)
    exact = np.array(x.astype(mx.float32), np.float64) @ w64.T
    params = kernels.affine_params(lin)
    out = kernels.linear(x, params, (tokens, 520))
    out_res = kernels.linear(x, params, (tokens, 520), res)
    err, err_ref = rel_err(out, exact), rel_err(lin(x), exact)
    err_res = rel_err(out_res, exact + np.array(res.astype(mx.float32), np.float64))
    report("linear", tokens=tokens, bits=bits, group_size=group_size, kernel=err,
           reference=err_ref, with_residual=err_res)  # fmt: skip
    assert err <= max(1.5 * err_ref, 4e-3) and err_res <= 8e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tokens", [2, 7])
def test_attention_prologue_token_groups(tokens):
    """Width 2048: three tokens share each weight load, so 7 tokens leave a partial group."""
    layer = _wide_layer(n_heads=16)
    x = mx.random.normal((tokens, 1, 2048)).astype(mx.bfloat16)
    offset = mx.arange(3, 3 + tokens, dtype=mx.int32) * 37
    out, ref = _both(layer, lambda: layer.start(x, offset), {"attn_prologue": 1})
    errs = [
        rel_err(o, np.array(r.astype(mx.float32), np.float64))
        for o, r in zip(out, ref, strict=True)
    ]
    report("attn_prologue_groups", tokens=tokens, q=errs[0], k=errs[1], v=errs[2])
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert max(errs) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("batch", [1, 4])
def test_model_logits_kernels_on_vs_off(dtype, batch, dense):
    model, _ = tiny_model(dtype, dense=dense)
    tokens = np.random.default_rng(batch).integers(0, 512, (batch, 20))
    model.use_kernels("0")
    with counted_launches() as launches:
        off = run_tokens(model, tokens, steps=8)
    assert not launches, launches
    model.use_kernels("1")
    with counted_launches() as launches:
        on = run_tokens(model, tokens, steps=8)
    # Decode steps: prologue, o_proj (linear), the MoE or dense MLP kernels; the lm_head
    # (linear) from 2 rows. Short caches leave attention to MLX.
    ffn = {"moe_gate_up", "linear"} if dense else {"moe_router", "moe_gate_up", "moe_down"}
    assert {"attn_prologue", "linear"} | ffn <= set(launches), launches
    err = rel_err(on, off.astype(np.float64))
    agree = float((on.argmax(-1) == off.argmax(-1)).mean())
    if dtype == mx.float32:
        report("model_logits", dtype=str(dtype), batch=batch, dense=dense, rel=err, agree=agree)
        assert err < 1e-4
        return
    # bf16: both paths round differently (the kernels once per output, the reference ops at
    # every step), so judge each against the same weights upcast to float32 (exactly).
    truth_model, _ = tiny_model(dtype, dense=dense)
    truth_model.set_dtype(mx.float32)
    truth_model.use_kernels("0")
    truth = run_tokens(truth_model, tokens, steps=8).astype(np.float64)
    err_on, err_off = rel_err(on, truth), rel_err(off, truth)
    report("model_logits", dtype=str(dtype), batch=batch, dense=dense, rel=err, agree=agree,
           kernels_vs_f32=err_on, reference_vs_f32=err_off)  # fmt: skip
    assert err_on <= max(1.5 * err_off, 1e-2)


@pytest.mark.gpu
@gpu
def test_tied_embedding_logits_kernel(monkeypatch):
    """Tied quantized embeddings as the output head (Qwen3-0.6B to 4B) through the few-token
    linear kernel at batch 4, against the reference ops."""
    model, _ = tiny_model(mx.float32, dense=True, tied=True)
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding and "lm_head" not in model
    tokens = np.random.default_rng(7).integers(0, 512, (4, 20))
    model.use_kernels("0")
    off = run_tokens(model, tokens, steps=8)
    model.use_kernels("1")
    heads = []
    logits = kernels.logits
    monkeypatch.setattr(kernels, "logits", lambda head, h: heads.append(head) or logits(head, h))
    with counted_launches() as launches:
        on = run_tokens(model, tokens, steps=8)
    # The head through the kernel at each decode step (the 48-row prefill is left to MLX).
    assert len(heads) == 8 and all(h is model.model.embed_tokens for h in heads)
    assert launches["linear"] >= 8, launches
    err = rel_err(on, off.astype(np.float64))
    report("tied_logits", rel=err)
    assert err < 1e-4


def _layer(bits: int, group_size: int, dims: int = 512, moe: bool = True, yarn: bool = False):
    """One quantized bf16 decoder layer (8 q heads, 2 kv heads, head_dim 128)."""
    from qwen3_mlx.config import ModelArgs
    from qwen3_mlx.model import DecoderLayer

    args = ModelArgs.from_dict(
        dict(
            model_type="qwen3_moe" if moe else "qwen3", hidden_size=dims, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=64,
            intermediate_size=512, moe_intermediate_size=256, num_experts=32,
            num_experts_per_tok=4, norm_topk_prob=True,
            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 4096} if yarn else None,
        )
    )  # fmt: skip
    layer = DecoderLayer(args, 0)

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return {"group_size": 64, "bits": 8} if path.endswith("mlp.gate") else True

    nn.quantize(layer, group_size, bits, class_predicate=predicate)
    layer.set_dtype(mx.bfloat16)
    for norm in (
        layer.input_layernorm,
        layer.post_attention_layernorm,
        layer.self_attn.q_norm,
        layer.self_attn.k_norm,
    ):
        norm.weight = (1 + 0.1 * mx.random.normal(norm.weight.shape)).astype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


def _both(layer, fn, launched: dict[str, int]):
    """fn() on the reference ops, then with every kernel of `layer` forced on: (out, ref).
    `launched`: the launches the kernel side must make, by kernel."""
    kernels.use_plan(layer, OFF)
    with counted_launches() as launches:
        ref = fn()
        mx.eval(ref)
    assert not launches, launches
    kernels.use_plan(layer, every_kernel())
    with counted_launches() as launches:
        out = fn()
        mx.eval(out)
    assert launches == launched, launches
    return out, ref


LAYER_CASES = [(4, 64, 1, False), (8, 32, 3, True), (4, 128, 2, False), (8, 64, 1, True)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "b{}-g{}-L{}-yarn{}".format(*c))
@pytest.mark.parametrize("per_row", [False, True])
def test_attention_prologue_matches_reference(case, per_row):
    bits, group_size, seq, yarn = case
    layer = _layer(bits, group_size, yarn=yarn)
    x = mx.random.normal((3, seq, 512)).astype(mx.bfloat16)
    offset = mx.array([7, 700, 20000], mx.int32) if per_row else mx.array(321, mx.int32)
    out, ref = _both(layer, lambda: layer.start(x, offset), {"attn_prologue": 1})
    errs = [
        rel_err(o, np.array(r.astype(mx.float32), np.float64))
        for o, r in zip(out, ref, strict=True)
    ]
    report("attn_prologue", case=case, per_row=per_row, q=errs[0], k=errs[1], v=errs[2])
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert max(errs) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "b{}-g{}-T{}-yarn{}".format(*c))
@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
def test_layer_finish_matches_reference(case, moe):
    """o_proj + residual, then the (norm-folded) MoE block or dense MLP."""
    bits, group_size, tokens, _ = case
    # A token whose k-th and (k+1)-th router logits are within bf16 rounding of each other
    # may rightly get either expert (the two paths sum in different orders): judge the rest,
    # drawing the data again (seeded) while every token is such a near-tie.
    for seed in range(17 * tokens + bits, 17 * tokens + bits + 8):
        mx.random.seed(seed)
        layer = _layer(bits, group_size, moe=moe)
        attn = mx.random.normal((1, tokens, 8 * 128)).astype(mx.bfloat16)
        x = mx.random.normal((1, tokens, 512)).astype(mx.bfloat16)
        keep = ~_near_ties(layer, attn, x) if moe else np.ones(tokens, bool)
        if keep.any():
            break
    # o_proj + residual (linear), then the router (norm folded in), gate+up, down + sum; or the
    # dense MLP's gate+up and down (linear).
    launched = {"linear": 1, "moe_router": 1, "moe_gate_up": 1, "moe_down": 1}
    out, ref = _both(
        layer, lambda: layer.finish(attn, x), launched if moe else {"linear": 2, "moe_gate_up": 1}
    )
    assert out.shape == ref.shape
    got = np.array(out[0].astype(mx.float32))[keep]
    err = rel_err(got, np.array(ref[0].astype(mx.float32), np.float64)[keep])
    report("layer_finish", case=case, moe=moe, rel=err, near_ties=int((~keep).sum()))
    assert keep.sum() >= 1 and err < 1e-2


def _near_ties(layer, attn, x) -> np.ndarray:
    """Per token: is the top-k cut of the reference router logits a near-tie?"""
    mlp = layer.mlp
    h = x + layer.self_attn.o_proj(attn)
    logits = mlp.gate(layer.post_attention_layernorm(h)).astype(mx.float32)
    ordered = -np.sort(-np.array(logits[0]), axis=-1)
    k = mlp.top_k
    cut = ordered[:, k - 1]
    return cut - ordered[:, k] < 2e-2 * np.maximum(1.0, np.abs(cut))


def test_decode_attention_coverage(monkeypatch):
    """The decode attention kernel takes one query over a plain KV cache's views, no mask;
    its split count follows the cache length (the kernel derives the same from the shape)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    assert [kernels.attention_splits(n) for n in (1, 32, 33, 100, 1024, 2048, 10**6)] == [
        1, 1, 2, 4, 32, 32, 32,
    ]  # fmt: skip
    # Counters wrap at 2^32: the per-launch step must divide it; the merge has a lane per split.
    assert tuning.ATTENTION_MAX_SPLITS & (tuning.ATTENTION_MAX_SPLITS - 1) == 0
    assert tuning.ATTENTION_MAX_SPLITS <= 32

    def views(cache, heads=16, kv_heads=2, head_dim=128, length=40, batch=1):
        kv = mx.zeros((batch, kv_heads, length, head_dim))
        keys, values = cache.update_and_fetch(kv, kv)
        return mx.zeros((batch, heads, 1, head_dim)), keys, values

    # Threadgroup memory: Apple GPUs have 32 KB, CUDA's static shared memory 48 KB.
    threads = attention_kernels._attention_threads
    with kernels.launched_by(refuse_launch, "metal"):
        assert threads(8, 128) == 128 and threads(2, 128) == 256
    with kernels.launched_by(refuse_launch, "cuda"):
        assert threads(8, 128) == 256 and threads(8, 256) == 128
    covered = kernels.decode_attention_covered
    cache = KVCache()
    q, k, v = views(cache)
    monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1)
    with kernels.launched_by(refuse_launch, "metal"):  # no hand-off: MLX's attention
        assert not covered(q, k, v, None, cache)
    with kernels.launched_by(refuse_launch, "cuda"):
        assert covered(q, k, v, None, cache)
        monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1024)
        assert not covered(q, k, v, None, cache)  # short caches stay on MLX's attention
        monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1)
        assert covered(q, k, v, None, cache)
        assert not covered(q, k, v, "causal", cache)
        assert not covered(mx.zeros((1, 16, 2, 128)), k, v, None, cache)  # two queries
        assert not covered(q.astype(mx.bfloat16), k, v, None, cache)  # mixed dtypes
        cache = KVCache()
        assert covered(*views(cache), None, cache)  # a fresh cache of the same shape
        cache = KVCache()
        assert not covered(*views(cache, head_dim=64), None, cache)
        cache = KVCache()
        assert not covered(*views(cache, heads=6, kv_heads=4), None, cache)
        cache = KVCache()
        assert not covered(*views(cache, heads=8, kv_heads=8), None, cache)  # 1 per KV head
        cache = RotatingKVCache(max_size=64)
        assert not covered(*views(cache), None, cache)
        cache = QuantizedKVCache()
        q, k, v = views(cache)
        assert not covered(q, k, v, None, cache)
    with kernels.launched_by(refuse_launch, "cuda"):
        # The server's batch: left-padded rows that say where they start, covered at any
        # length (MLX's CUDA attention has no fused kernel for a mask); a window's mask says
        # more than starts (row_starts None): not covered.
        monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1024)
        q, k, v = views(KVCache(), batch=3)
        padded = type("Padded", (), {"row_starts": mx.array([0, 4, 39], dtype=mx.int32)})()
        assert covered(q, k, v, None, padded)
        windowed = type("Windowed", (), {"row_starts": None})()
        assert not covered(q, k, v, mx.ones((3, 1, 1, 40), dtype=mx.bool_), windowed)
        wrong = type("Wrong", (), {"row_starts": mx.array([0, 4], dtype=mx.int32)})()
        assert not covered(q, k, v, None, wrong)
    with kernels.launched_by(refuse_launch, "metal"):  # Metal: MLX's attention takes masks
        assert not covered(q, k, v, None, padded)


def _filled_cache(batch, kv_heads, head_dim, length, dtype, seed):
    """A KVCache holding `length` positions, and the views its next update returns."""
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = KVCache()
    shape = (batch, kv_heads, length - 1, head_dim)
    if length > 1:
        cache.update_and_fetch(mx.random.normal(shape).astype(dtype),
                               mx.random.normal(shape).astype(dtype))  # fmt: skip
    one = (batch, kv_heads, 1, head_dim)
    keys, values = cache.update_and_fetch(mx.random.normal(one).astype(dtype),
                                          mx.random.normal(one).astype(dtype))  # fmt: skip
    return cache, keys, values


# Query heads, KV heads, head_dim: 30B, 0.6B, 235B, 8B, 14B, and head_dim 256.
ATTENTION_SHAPES = [
    (32, 4, 128),
    (16, 8, 128),
    (64, 4, 128),
    (32, 8, 128),
    (40, 8, 128),
    (4, 2, 256),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "H{}-KV{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_attention_matches_sdpa(shape, dtype, batch, monkeypatch):
    """Against MLX's attention in float32 over the same cache views, for cache lengths that
    take 1 to 32 splits, one after another on the same arrival counters (the split count
    changes between launches)."""
    heads, kv_heads, head_dim = shape
    monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1)
    monkeypatch.setattr(tuning, "ATTENTION_CHECKED_GROUPS", (heads // kv_heads,))

    class Owner:  # the call site the counters belong to
        pass

    owner, scale = Owner(), head_dim**-0.5
    for i, length in enumerate([1, 7, 32, 33, 100, 1000, 2048, 3001, 40]):
        cache, keys, values = _filled_cache(batch, kv_heads, head_dim, length, dtype, i)
        q = (2 * mx.random.normal((batch, heads, 1, head_dim))).astype(dtype)
        assert kernels.decode_attention_covered(q, keys, values, None, cache)
        out = kernels.decode_attention(q, keys, values, scale, owner)
        f32 = [a.astype(mx.float32) for a in (q, keys, values)]
        ref = mx.fast.scaled_dot_product_attention(*f32, scale=scale)
        err = rel_err(out, np.array(ref, np.float64))
        report("decode_attention", shape=shape, dtype=str(dtype), batch=batch, length=length,
               rel=err)  # fmt: skip
        assert out.shape == q.shape and out.dtype == dtype
        assert err < (1e-5 if dtype == mx.float32 else 1e-2), length


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_model_logits_decode_attention_on_vs_off(batch, monkeypatch):
    """Whole model (head_dim 128 as in every Qwen3), a 70-token prompt then 8 decode steps
    (3 splits), with the decode attention kernel against MLX's attention."""
    model, _ = tiny_model(mx.float32, head_dim=128)
    monkeypatch.setattr(tuning, "ATTENTION_MIN_KEYS", 1)
    tokens = np.random.default_rng(batch).integers(0, 512, (batch, 78))
    everything = every_kernel()
    assert model.use_kernels(KernelOptions(kernels="1", attention=False)) == everything.without(
        "attention"
    )
    with counted_launches() as launches:
        off = run_tokens(model, tokens, steps=8)
    assert "decode_attention" not in launches and launches, launches
    assert model.use_kernels("1") == everything
    with counted_launches() as launches:
        on = run_tokens(model, tokens, steps=8)
    # Called outside the compiled steps: one launch per layer and decode step.
    assert launches["decode_attention"] == 8 * len(model.layers), launches
    err = rel_err(on, off.astype(np.float64))
    report("model_logits_decode_attention", batch=batch, rel=err)
    assert err < 1e-4

"""Launch-shape sweep of the few-token kernels (GPU only): GPU time per launch, per shape,
and whole decode steps of a model preset under each setting (section `step`).

    python -m benchmarks.tune_kernels \\
        --out benchmarks/results/tune_kernels_<model>_<machine>_<date>.json

Each measurement launches the kernel on `--distinct` different random weights (so the L2
cache does not hold them, as in a real step), `--launches` times in one evaluation, and
reports the median time per launch. The launch shapes are constants of
qwen3_mlx.kernels.tuning (read at launch time), set here for the duration of one measurement;
the winners go back into tuning.py by hand, with the figures that chose them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx import kernels
from qwen3_mlx.kernels import KernelOptions, tuning

# (name, in_dims, out_dims): the output projection of Qwen3-30B-A3B, and Qwen3-8B's output and
# down projections
LINEAR_SHAPES = [
    ("30b.o_proj", 4096, 2048),
    ("30b.qkv", 2048, 5120),
    ("8b.o_proj", 4096, 4096),
    ("8b.down", 12288, 4096),
]
# Qwen3-30B-A3B experts: 128 experts of hidden 2048 -> 768, top-8
MOE_SHAPE = dict(experts=128, dims=2048, hidden=768, top_k=8)


def per_launch(fn, launches: int, repeats: int) -> float:
    """Median seconds per launch of `launches` calls of fn(i) evaluated together."""
    mx.eval([fn(i) for i in range(launches)])
    times = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval([fn(i) for i in range(launches)])
        mx.synchronize()
        times.append((time.perf_counter() - start) / launches)
    return statistics.median(times)


def quantized_linears(in_dims, out_dims, count, bits, group_size):
    layers = []
    for i in range(count):
        mx.random.seed(i)
        layer = nn.QuantizedLinear.from_linear(
            nn.Linear(in_dims, out_dims, bias=False), group_size, bits
        )
        layer.set_dtype(mx.bfloat16)
        mx.eval(layer.parameters())
        layers.append(layer)
    return layers


class RandomExperts(nn.Module):
    def __init__(self, experts, dims, hidden):
        super().__init__()
        scale = dims**-0.5
        for name, shape in (
            ("gate_proj", (experts, hidden, dims)),
            ("up_proj", (experts, hidden, dims)),
            ("down_proj", (experts, dims, hidden)),
        ):
            setattr(self, name, _QuantizedStack(mx.random.normal(shape) * scale))


class _QuantizedStack(nn.Module):
    """A stack of expert matrices in MLX's affine format (what kernels.affine_params reads)."""

    def __init__(self, weight, bits=4, group_size=64):
        super().__init__()
        self.weight, self.scales, self.biases = mx.quantize(weight, group_size, bits)
        self.scales = self.scales.astype(mx.bfloat16)
        self.biases = self.biases.astype(mx.bfloat16)
        self.group_size, self.bits, self.mode = group_size, bits, "affine"


def sweep(constants: dict[str, list[int]]):
    """Every combination of the given tuning constants, each as a dict."""
    names = list(constants)
    for values in itertools.product(*(constants[n] for n in names)):
        yield dict(zip(names, values, strict=True))


def _owner(name: str):
    """(object, attribute) a setting names: a constant of kernels.tuning, or "KVCache.step"."""
    if name == "KVCache.step":
        from mlx_lm.models.cache import KVCache

        return KVCache, "step"
    if not hasattr(tuning, name):  # setattr would add it, and nothing would read it
        raise KeyError(f"{name}: not a constant of qwen3_mlx.kernels.tuning")
    return tuning, name


def with_constants(settings: dict, fn):
    """fn() with the settings' tuning constants (and KVCache.step) set."""
    saved = {name: getattr(*_owner(name)) for name in settings}
    for name, value in settings.items():
        setattr(*_owner(name), value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(*_owner(name), value)


# Whole-step variants: tuning constants to set, and under "options" KernelOptions fields that
# differ from the environment's switches (the model's plan for the variant); empty: as
# committed.
STEP_VARIANTS = {
    "default": {},
    "o MT=1": {"LINEAR_TOKENS": 1},
    "o MT=4": {"LINEAR_TOKENS": 4},
    "o qmm": {"LINEAR_MAX_TOKENS": 1},
    "head MT=2": {"LOGITS_TOKENS": 2},
    "head qmm": {"LOGITS_MAX_TOKENS": 1},
    "down rows 4": {"DOWN_ROWS": 4},
    "gate_up PG=1": {"GATE_UP_PAIRS": 1},
    "router ref": {"options": {"router": False}},
    "router split 1": {"ROUTER_SPLIT": 1},
    "router split 4": {"ROUTER_SPLIT": 4},
    "prologue split 1": {"PROLOGUE_SPLIT": 1},
    "prologue split 2": {"PROLOGUE_SPLIT": 2},
    "unsplit": {"ROUTER_SPLIT": 1, "PROLOGUE_SPLIT": 1},
    "prologue 2 tokens": {"PROLOGUE_TOKENS": 2},
    # MLX's CUDA attention takes cuDNN for one query over a cache whose capacity is a
    # multiple of 256 (mlx-lm's growth step) and its own vector kernel otherwise.
    "cache step 257": {"KVCache.step": 257},
    # The decode attention kernel: off, and its launch shape.
    "sdpa attention": {"options": {"attention": False}},
    "attn heads 4": {"ATTENTION_HEADS": 4},
    "attn threads 128": {"ATTENTION_THREADS": 128},
    "attn splits 16": {"ATTENTION_MAX_SPLITS": 16},
    "attn keys 16": {"ATTENTION_SPLIT_KEYS": 16},
    "attn from 1": {"ATTENTION_MIN_KEYS": 1},
}


def variant_plan(settings: dict):
    """The kernel plan of a whole-step variant: the environment's switches, with the
    variant's "options" over them."""
    options = dataclasses.replace(KernelOptions.from_env(), **settings.get("options", {}))
    return kernels.plan_for(options)


def step_section(args, record):
    from mlx_lm.models.cache import make_prompt_cache

    from .decode import decode, fill_cache
    from .models import PRESETS, build

    models, _ = build(args.preset, 4, 64, impls=["ours"])
    model = models["ours"]
    vocab = PRESETS[args.preset]["vocab_size"]
    variants = args.variants.split(";")
    for name in variants:  # a mistyped variant stops here, before any timing
        for setting in STEP_VARIANTS[name]:
            if setting != "options":
                _owner(setting)
    for batch in (int(b) for b in args.batch.split(",")):
        for name in variants:
            settings = dict(STEP_VARIANTS[name])
            # Decided outside the constants (a check would run with the committed shapes);
            # use_kernels forgets the compiled steps, run() does again under the constants.
            model.use_kernels(variant_plan(settings))
            settings.pop("options", None)

            def run(batch=batch):
                model.model.reset_compiled()
                cache = make_prompt_cache(model)
                fill_cache(cache, batch, args.prompt, model)
                token = mx.random.randint(0, vocab, (batch,))
                decode(model, token, cache, 8)  # trace and JIT
                times = decode(model, token, cache, args.steps)
                return [t / args.steps for t in times]

            step, host, build = with_constants(settings, run)
            record(kernel="step", preset=args.preset, batch=batch, variant=name,
                   step_ms=step * 1e3, host_ms=host * 1e3, build_ms=build * 1e3,
                   tok_s=batch / step)  # fmt: skip
    model.use_kernels(variant_plan({}))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--distinct", type=int, default=12)
    parser.add_argument("--launches", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="linear,moe")
    parser.add_argument("--shapes", default=",".join(n for n, _, _ in LINEAR_SHAPES))
    parser.add_argument("--preset", default="qwen3-30b-a3b", help="step section")
    parser.add_argument("--batch", default="1,8", help="step section")
    parser.add_argument("--prompt", type=int, default=128, help="step section")
    parser.add_argument("--steps", type=int, default=48, help="step section")
    parser.add_argument(
        "--variants", default=";".join(STEP_VARIANTS), help="step section, ;-separated"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if kernels.backend() is None:
        raise SystemExit("tune_kernels needs a GPU backend (CUDA or Metal)")
    token_counts = [int(t) for t in args.tokens.split(",")]
    command = "python -m benchmarks.tune_kernels " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    results = {"mlx": mx.__version__, "command": command, "prompt": args.prompt, "runs": []}

    def record(**row):
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    if "linear" in args.sections:
        for name, in_dims, out_dims in LINEAR_SHAPES:
            if name not in args.shapes.split(","):
                continue
            layers = quantized_linears(in_dims, out_dims, args.distinct, 4, 64)
            for tokens in token_counts:
                x = mx.random.normal((tokens, in_dims)).astype(mx.bfloat16)
                res = mx.random.normal((tokens, out_dims)).astype(mx.bfloat16)
                mx.eval(x, res)

                def ref(i, x=x, layers=layers, res=res):
                    return res + layers[i % len(layers)](x)

                record(kernel="linear", shape=name, tokens=tokens, config="reference",
                       us=per_launch(ref, args.launches, args.repeats) * 1e6)  # fmt: skip
                grid = {
                    "LINEAR_WARPS": [4],
                    "LINEAR_ROWS": [2, 4],
                    "LINEAR_TOKENS": [m for m in (1, 2, 4, 8) if m <= tokens],
                }
                if tokens == 1:
                    grid = {"LINEAR_WARPS": [4], "LINEAR_ROWS": [1, 2, 4], "LINEAR_TOKENS": [1]}
                for settings in sweep(grid):

                    def fused(i, x=x, layers=layers, res=res):
                        layer = layers[i % len(layers)]
                        return kernels.linear(x, kernels.affine_params(layer), res.shape, res)

                    us = with_constants(
                        settings, lambda f=fused: per_launch(f, args.launches, args.repeats)
                    )
                    record(kernel="linear", shape=name, tokens=tokens, config=settings,
                           us=us * 1e6)  # fmt: skip

    if "step" in args.sections:
        step_section(args, record)

    if "moe" in args.sections:
        shape = MOE_SHAPE
        stacks = []
        for i in range(args.distinct):
            mx.random.seed(100 + i)
            stacks.append(RandomExperts(shape["experts"], shape["dims"], shape["hidden"]))
            mx.eval(stacks[-1].parameters())
        for tokens in token_counts:
            x = mx.random.normal((tokens, shape["dims"])).astype(mx.bfloat16)
            logits = mx.random.normal((tokens, shape["experts"]))
            indices = mx.argsort(-logits, axis=-1)[:, : shape["top_k"]].astype(mx.uint32)
            scores = mx.softmax(logits, axis=-1)[:, : shape["top_k"]]
            mx.eval(x, indices, scores)
            grid = {
                "GATE_UP_WARPS": [4],
                "GATE_UP_ROWS": [1, 2, 4],
                "GATE_UP_PAIRS": [1, 2, 4] if tokens > 1 else [1],
            }
            for settings in sweep(grid):

                def up(i, x=x, indices=indices):
                    e = stacks[i % len(stacks)]
                    wg, sg, bg, gs, bits = kernels.affine_params(e.gate_proj)
                    wu, su, bu, _, _ = kernels.affine_params(e.up_proj)
                    return kernels.gate_up(x, indices, (wg, sg, bg), (wu, su, bu), gs, bits)

                us = with_constants(
                    settings, lambda f=up: per_launch(f, args.launches, args.repeats)
                )
                record(kernel="gate_up", tokens=tokens, config=settings, us=us * 1e6)
            h = mx.random.normal((tokens * shape["top_k"], shape["hidden"])).astype(mx.bfloat16)
            mx.eval(h)
            for settings in sweep({"DOWN_WARPS": [4], "DOWN_ROWS": [1, 2, 4]}):

                def down(i, h=h, x=x, indices=indices, scores=scores):
                    e = stacks[i % len(stacks)]
                    params = kernels.affine_params(e.down_proj)
                    return kernels.down(h, indices, scores, params, x.shape, x)

                us = with_constants(
                    settings, lambda f=down: per_launch(f, args.launches, args.repeats)
                )
                record(kernel="down", tokens=tokens, config=settings, us=us * 1e6)


if __name__ == "__main__":
    main()

"""Per-layer timings of the decode/prefill building blocks (fused kernels vs reference ops).

    python -m benchmarks.micro --preset qwen3-30b-a3b --out results/micro.json

Each measurement chains the op over `--layers` distinct random layers (as a decode step
does), evaluates, and reports the median time per layer over several repeats: uncompiled
(host + device) and under mx.compile (closer to GPU time alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx import kernels
from qwen3_mlx.errors import ConfigError
from qwen3_mlx.kernels import OFF, KernelOptions, KernelPlan
from qwen3_mlx.moe import SparseMoeBlock

from .models import PRESETS


def timed(fn, repeats: int = 7) -> float | Exception:
    try:
        return _timed(fn, repeats)
    except Exception as exc:  # e.g. MLX 0.32.4 CUDA: compiling 48 reference routers raises
        return exc


def _timed(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_blocks(config: dict, n: int, bits: int, group_size: int) -> list[SparseMoeBlock]:
    blocks = []
    for i in range(n):
        mx.random.seed(i)
        block = SparseMoeBlock(
            config["hidden_size"],
            config["moe_intermediate_size"],
            config["num_experts"],
            config["num_experts_per_tok"],
            True,
        )
        block.gate.weight = block.gate.weight * 8

        def predicate(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            return {"group_size": 64, "bits": 8} if path == "gate" else True

        nn.quantize(block, group_size, bits, class_predicate=predicate)
        block.set_dtype(mx.bfloat16)
        mx.eval(block.parameters())
        blocks.append(block)
    return blocks


def set_moe_plan(block: SparseMoeBlock, plan: KernelPlan) -> None:
    """The block's router and its experts run `plan` (a model hands its plan to both)."""
    block.kernel_plan = block.switch_mlp.kernel_plan = plan


def moe_plan(mode: str) -> KernelPlan:
    """The MoE kernels forced on ("1": a ConfigError without Metal/CUDA) or off ("0")."""
    return kernels.plan_for(KernelOptions(kernels="0", moe=mode))


def moe_chain(blocks, layers: int, plan: KernelPlan):
    """x → x + moe(x) over `layers` layers, cycling through `blocks`."""

    def run(x):
        for i in range(layers):
            block = blocks[i % len(blocks)]
            set_moe_plan(block, plan)  # the blocks are shared by both plans' chains
            x = block(x, residual=x)
        return x

    return run


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--distinct", type=int, default=8, help="distinct layer weights")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sections", default="moe,parts,sdpa,prefill,dense")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    sections = args.sections.split(",")
    results: dict = {"preset": args.preset, "mlx": mx.__version__, "per_layer_us": {}}
    out = results["per_layer_us"]
    dims, L = config["hidden_size"], args.layers

    def record(name, seconds, layers=L):
        if isinstance(seconds, Exception):  # keep going: one failing variant costs no data
            out[name] = f"error: {seconds}"
            print(f"{name:55s} {out[name]}", flush=True)
            return
        out[name] = round(seconds / layers * 1e6, 2)
        print(f"{name:55s} {out[name]:10.2f} us/layer", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    blocks = make_blocks(config, args.distinct, args.bits, args.group_size)
    if "moe" in sections:
        for tokens in (1, 8):
            x = mx.random.normal((tokens, 1, dims)).astype(mx.bfloat16)
            for mode in ("0", "1"):
                try:
                    plan = moe_plan(mode)
                except ConfigError as exc:  # forced on without Metal/CUDA
                    record(f"moe T={tokens} kernels={mode}", exc)
                    continue
                chain = moe_chain(blocks, L, plan)
                record(f"moe T={tokens} kernels={mode} eager", timed(lambda c=chain, x=x: c(x)))
                compiled = mx.compile(chain)
                record(
                    f"moe T={tokens} kernels={mode} compiled",
                    timed(lambda c=compiled, x=x: c(x)),
                )

    if "parts" in sections:
        x = mx.random.normal((1, dims)).astype(mx.bfloat16)
        block = blocks[0]
        set_moe_plan(block, OFF)  # the reference ops; the kernels are called directly below
        idx, sc = block.route(x)
        mx.eval(idx, sc)
        sw = block.switch_mlp

        def ref_up():
            xe = mx.expand_dims(x, (-2, -3))
            return nn.silu(sw.gate_proj(xe, idx)) * sw.up_proj(xe, idx)

        h = ref_up()
        mx.eval(h)
        parts = {
            "router ref": lambda: blocks[0].route(x),
            "gate+up ref (2 gather_qmm + silu*mul)": ref_up,
            "down ref (gather_qmm + weighted sum)": lambda: (
                sw.down_proj(h, idx).squeeze(-2) * sc[..., None]
            ).sum(-2),
        }
        for name, fn in parts.items():
            record(f"part {name} x{L}", timed(lambda fn=fn: [fn() for _ in range(L)]))
            cf = mx.compile(lambda fn=fn: [fn() for _ in range(L)])
            record(f"part {name} x{L} compiled", timed(cf))
        for name, fn in {
            "router kernel": lambda: kernels.moe_router(x, block.gate, block.top_k, True),
            "experts kernels (up+down)": lambda: kernels.moe_experts(sw, x, idx, sc),
        }.items():
            record(f"part {name} x{L}", timed(lambda fn=fn: [fn() for _ in range(L)]))
            cf = mx.compile(lambda fn=fn: [fn() for _ in range(L)])
            record(f"part {name} x{L} compiled", timed(cf))

    if "sdpa" in sections:
        hq, hkv, hd = (
            config["num_attention_heads"],
            config["num_key_value_heads"],
            config["head_dim"],
        )
        for batch in (1, 8):
            for ctx in (128, 2048):
                q = mx.random.normal((batch, hq, 1, hd)).astype(mx.bfloat16)
                kv = [
                    mx.random.normal((batch, hkv, ctx + 256, hd)).astype(mx.bfloat16)
                    for _ in range(2)
                ]
                k, v = kv[0][..., :ctx, :], kv[1][..., :ctx, :]  # a KVCache view
                mx.eval(q, *kv)

                def sdpa(k=k, v=v, q=q):
                    o = q
                    for _ in range(L):
                        o = mx.fast.scaled_dot_product_attention(o, k, v, scale=hd**-0.5)
                    return o

                record(f"sdpa decode B={batch} ctx={ctx}", timed(sdpa))

    if "prefill" in sections:
        tokens = 2048
        x = mx.random.normal((1, tokens, dims)).astype(mx.bfloat16)
        block = blocks[0]
        set_moe_plan(block, OFF)
        idx, sc = block.route(x)
        mx.eval(idx, sc)
        sw = block.switch_mlp
        for n in (64, 512, 2048):
            xn, idn, scn = x[:, :n], idx[:, :n], sc[:, :n]
            record(
                f"prefill moe T={n} per-pair (sorted gather_qmm, mlx-lm's way)",
                timed(lambda xn=xn, idn=idn, scn=scn: sw.per_pair(xn, idn, scn), 3),
                1,
            )
            for rows in (16, 32, 64):
                record(
                    f"prefill moe T={n} blocked rows={rows}",
                    timed(lambda xn=xn, idn=idn, scn=scn, r=rows: sw.blocked(xn, idn, scn, r), 3),
                    1,
                )
        dense = {
            n: mx.dequantize(p.weight, p.scales, p.biases, p.group_size, p.bits)
            for n, p in (("g", sw.gate_proj), ("u", sw.up_proj), ("d", sw.down_proj))
        }
        mx.eval(dense)

        def dequant_path():
            k = idx.shape[-1]
            flat = idx.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = mx.expand_dims(x.reshape(-1, dims), (-2,))[order // k]
            ids = flat[order]
            g = mx.gather_mm(xs, dense["g"].swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
            u = mx.gather_mm(xs, dense["u"].swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True)
            y = mx.gather_mm(
                nn.silu(g) * u, dense["d"].swapaxes(-1, -2), rhs_indices=ids, sorted_indices=True
            )
            y = y[inv].reshape(1, tokens, k, dims)
            return (y * sc[..., None]).sum(-2)

        record(
            "prefill moe T=2048 bf16 gather_mm sorted (weights pre-dequantized)",
            timed(dequant_path, 3),
            1,
        )
        record(
            "prefill moe T=2048 dequantize all experts (3 mats)",
            timed(
                lambda: [
                    mx.dequantize(p.weight, p.scales, p.biases, p.group_size, p.bits)
                    for p in (sw.gate_proj, sw.up_proj, sw.down_proj)
                ],
                3,
            ),
            1,
        )

    if "dense" in sections:
        for m_rows in (1, 2048):
            x = mx.random.normal((m_rows, dims)).astype(mx.bfloat16)
            lin = nn.QuantizedLinear(
                dims, 5120, bias=False, group_size=args.group_size, bits=args.bits
            )
            lin.set_dtype(mx.bfloat16)
            mx.eval(lin.parameters())
            wd = mx.dequantize(lin.weight, lin.scales, lin.biases, lin.group_size, lin.bits)
            mx.eval(wd)
            record(
                f"qkv qmm M={m_rows} 2048->5120",
                timed(lambda lin=lin, x=x: [lin(x) for _ in range(L)]),
            )
            record(
                f"qkv bf16 matmul M={m_rows} 2048->5120",
                timed(lambda x=x, wd=wd: [x @ wd.T for _ in range(L)]),
            )
    return results


if __name__ == "__main__":
    main()

"""Decode and prefill speed of qwen3_mlx next to mlx-lm, same weights, same run.

    python -m benchmarks.decode --preset qwen3-30b-a3b --bits 4 --prompt 128,2048 \\
        --gen 256 --batch 1,8

Both projects get the same random quantized weights (benchmarks/models.py) and the same
timing loop: the prompt is prefilled in one call (time to first token = prefill + first
argmax), then greedy decode steps are pipelined the way mlx-lm's generate does it (step t+1
is built and queued with async_eval before step t's token is read). Every configuration is
run once untimed first (MLX compiles kernels on first use), then `--repeats` times with the
implementations taking turns (a load change on a shared machine hits all of them alike);
the median is reported, and next to the ratio of medians the median of the per-round
ratios (`decode_ratio_vs_mlx_lm_paired`). For batch > 1 the KV cache is filled with random
keys/values of the prompt length instead of a real batched prefill (decode speed depends
only on the cache length); prefill speed is measured at batch 1. Per step it also records the
host's time (`host_ms_per_step`: building the step's graph and handing it to the backend;
when it equals `step_ms`, the device waits on the host) and the building part alone
(`build_ms_per_step`).

Variants of this project: `ours` (defaults: kernels "auto", compiled decode), `ours:kernels=0`
(reference ops; `kernels=1` forces every kernel), `ours:compile=0` (uncompiled decode step),
`ours:router=0` (reference routing, expert kernels on), combinable as
`ours:kernels=0:compile=0`; each is applied to the model with `Model.use_kernels`.
Writes <out>.json and <out>.png (with the command line and MLX version).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from qwen3_mlx.kernels import KernelOptions, plan_for
from qwen3_mlx.model import compile_mode

from .figures import save_with_command
from .models import PRESETS, build

RESULTS = Path(__file__).with_name("results")


def variant_switches(variant: str) -> tuple[KernelOptions, str]:
    """`ours:kernels=0:compile=0:router=0` → (the kernel options, the compile switch); every
    switch a variant leaves out has its default (the environment's switches are not read)."""
    fields: dict = {}
    compile_value = "1"
    for option in variant.split(":")[1:]:
        key, _, value = option.partition("=")
        if key == "kernels":
            fields["kernels"] = value
        elif key == "router":
            if value not in ("0", "1", "auto"):
                raise ValueError(f"{variant}: router={value!r}, expected 0, 1 or auto")
            fields["router"] = value != "0"
        elif key == "compile":
            compile_value = value
        else:
            raise ValueError(f"{variant}: unknown switch {key!r} (kernels, compile, router)")
    return KernelOptions(**fields), compile_mode(compile_value)


def set_variant(model, variant: str) -> None:
    """Give the model the variant's kernels and compile switch (its compiled steps are kept
    when neither changes, as for one variant timed round after round)."""
    options, compile_value = variant_switches(variant)
    plan = plan_for(options)
    if plan != model.kernel_plan or compile_value != model.model.compile_mode:
        model.use_kernels(plan, compile=compile_value)


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits[:, -1, :], axis=-1)


def prefill(model, prompt: mx.array, cache) -> tuple[mx.array, float]:
    mx.synchronize()
    start = time.perf_counter()
    token = greedy(model(prompt, cache=cache))
    mx.eval(token)
    return token, time.perf_counter() - start


def fill_cache(cache, batch: int, length: int, model) -> None:
    """Random keys/values of `length` positions (decode cost depends on the length only)."""
    attn = model.layers[0].self_attn
    n_kv = getattr(attn, "n_kv_heads", None) or attn.k_proj.weight.shape[0] // attn.head_dim
    head_dim = getattr(attn, "head_dim", None) or model.args.head_dim
    for c in cache:
        dtype = model.layers[0].input_layernorm.weight.dtype
        k = mx.random.normal((batch, n_kv, length, head_dim)).astype(dtype)
        v = mx.random.normal((batch, n_kv, length, head_dim)).astype(dtype)
        c.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])


def decode(model, token: mx.array, cache, steps: int) -> tuple[float, float, float]:
    """(seconds, host seconds, build seconds) for `steps` pipelined greedy decode steps (after
    one untimed).

    Host seconds: time spent building and dispatching the steps' graphs, i.e. the part the
    device cannot overlap if it is the larger one. Build seconds, its first part: Python and
    graph construction (the model call), before `mx.async_eval` hands the graph to the backend.
    """

    def step(tok):
        return greedy(model(tok[:, None], cache=cache))

    y = step(token)
    mx.async_eval(y)
    y.tolist()
    host = build = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        host += time.perf_counter() - t0
        build += t1 - t0
        y.tolist()
        y = nxt
    y.tolist()
    return time.perf_counter() - start, host, build


def run_config(model, vocab: int, batch: int, prompt_len: int, gen: int) -> dict:
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    result = {}
    if batch == 1:
        prompt = mx.random.randint(0, vocab, (1, prompt_len))
        token, seconds = prefill(model, prompt, cache)
        result.update(ttft_s=seconds, prefill_tok_s=prompt_len / seconds)
    else:
        fill_cache(cache, batch, prompt_len, model)
        token = mx.random.randint(0, vocab, (batch,))
    seconds, host, build = decode(model, token, cache, gen)
    result.update(
        decode_tok_s=batch * gen / seconds,
        step_ms=1e3 * seconds / gen,
        host_ms_per_step=1e3 * host / gen,
        build_ms_per_step=1e3 * build / gen,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    return result


def bytes_per_step(model, config: dict, batch: int, context: int) -> float:
    """Weight + KV bytes one decode step must read (experts: only the routed ones)."""
    total = 0.0
    num_experts = config.get("num_experts", 0)
    k = config.get("num_experts_per_tok", 0)
    for name, value in tree_flatten(model.parameters()):
        if "embed_tokens" in name and not config.get("tie_word_embeddings"):
            continue  # a gather of `batch` rows
        if ".switch_mlp." in name and num_experts:
            used = num_experts * (1 - (1 - k / num_experts) ** batch)
            total += value.nbytes * used / num_experts
        else:
            total += value.nbytes
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * 2  # bf16 K and V per position
    total += batch * context * kv * config["num_hidden_layers"]
    return total


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), median of 5."""
    x = mx.random.uniform(shape=(256 * 1024 * 1024,))  # 1 GiB
    mx.eval(x)
    times = []
    for _ in range(6):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(x + 1)
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times[1:])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    configs = list(dict.fromkeys((r["batch"], r["prompt"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = []
        for batch, prompt in configs:
            match = [
                r
                for r in rows
                if r["impl"] == impl and (r["batch"], r["prompt"]) == (batch, prompt)
            ]
            vals.append(match[0]["decode_tok_s"] if match else 0)
        xs = [j + i * width for j in range(len(configs))]
        axes[0].bar(xs, vals, width, label=impl)
        for x, v in zip(xs, vals, strict=True):
            axes[0].text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(configs))])
    axes[0].set_xticklabels([f"batch {b}\nprompt {p}" for b, p in configs])
    axes[0].set_ylabel("decode tokens/s (all rows)")
    axes[0].legend(fontsize=8)
    prompts = sorted({r["prompt"] for r in rows if "prefill_tok_s" in r})
    for i, impl in enumerate(impls):
        vals = []
        for p in prompts:
            match = [
                r for r in rows if r["impl"] == impl and r["prompt"] == p and "prefill_tok_s" in r
            ]
            vals.append(match[0]["prefill_tok_s"] if match else 0)
        xs = [j + i * width for j in range(len(prompts))]
        axes[1].bar(xs, vals, width, label=impl)
    axes[1].set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(prompts))])
    axes[1].set_xticklabels([f"prompt {p}" for p in prompts])
    axes[1].set_ylabel("prefill tokens/s (batch 1)")
    meta = results["meta"]
    fig.suptitle(
        f"{meta['preset']} {meta['bits']}-bit g{meta['group_size']} on {meta['device']} "
        f"(mlx {meta['mlx']}, mlx-lm {meta['mlx_lm']})",
        fontsize=10,
    )
    save_with_command(fig, path, meta["command"], top=0.95)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--prompt", default="128,2048", help="prompt lengths, comma-separated")
    parser.add_argument("--gen", type=int, default=256, help="timed decode steps")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument(
        "--impl", default="ours,mlx-lm", help="ours[:kernels=0][:compile=0][:router=0],mlx-lm"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="output path without extension")
    parser.add_argument("--device-label", default=None)
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="scales/activations; auto: bfloat16 on GPU, float32 on CPU (MLX's CPU "
        "quantized matmul is ~10x slower in bfloat16)",
    )
    parser.add_argument("--time-budget", type=float, default=0, help="skip runs after N s")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import mlx_lm

    prompts = [int(p) for p in args.prompt.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    variants = args.impl.split(",")
    for variant in variants:  # a mistyped switch stops here, before any model is built
        if variant != "mlx-lm":
            variant_switches(variant)
    projects = sorted({"mlx-lm" if v == "mlx-lm" else "ours" for v in variants})
    config = PRESETS[args.preset]
    gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32")
    t0 = time.perf_counter()
    models, _ = build(
        args.preset, args.bits, args.group_size, impls=projects, dtype=getattr(mx, dtype_name)
    )
    build_s = time.perf_counter() - t0
    device = args.device_label or str(mx.default_device())
    bandwidth = copy_bandwidth() if gpu else None
    meta = dict(
        preset=args.preset,
        bits=args.bits,
        group_size=args.group_size,
        dtype=dtype_name,
        device=device,
        mlx=mx.__version__,
        mlx_lm=mlx_lm.__version__,
        python=platform.python_version(),
        command="python -m benchmarks.decode "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        build_s=round(build_s, 1),
        copy_bandwidth_gb_s=bandwidth / 1e9 if bandwidth else None,
        weights_gb=sum(v.nbytes for _, v in tree_flatten(models[projects[0]].parameters())) / 1e9,
        notes="batch>1 rows decode after a random KV cache of the prompt length",
    )
    print(json.dumps(meta), flush=True)
    runs, errors = [], []
    for batch in batches:
        for prompt in prompts:
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                print(f"time budget reached; skipping b{batch} p{prompt}", flush=True)
                continue
            reps: dict[str, list[dict]] = {variant: [] for variant in variants}
            failed: dict[str, str] = {}
            # Round 0 warms every variant up (compiles); then the variants take turns, so a
            # change of load on a shared machine hits all of them alike.
            for repeat in range(args.repeats + 1):
                for variant in variants:
                    if variant in failed:
                        continue
                    model = models["mlx-lm" if variant == "mlx-lm" else "ours"]
                    gen = args.gen if repeat else min(args.gen, 16)
                    try:
                        if variant != "mlx-lm":
                            set_variant(model, variant)
                        result = run_config(model, config["vocab_size"], batch, prompt, gen)
                    except Exception as exc:  # keep the other configurations' numbers
                        failed[variant] = f"{type(exc).__name__}: {exc}"[:2000]
                        continue
                    if repeat:
                        reps[variant].append(result)
            for variant in variants:
                model = models["mlx-lm" if variant == "mlx-lm" else "ours"]
                row = dict(impl=variant, batch=batch, prompt=prompt, gen=args.gen)
                if variant in failed:
                    row["error"] = failed[variant]
                    print(json.dumps(row), flush=True)
                    errors.append(row)
                    continue
                for key in reps[variant][0]:
                    row[key] = statistics.median(r[key] for r in reps[variant])
                row["decode_tok_s_all"] = [round(r["decode_tok_s"], 2) for r in reps[variant]]
                step_bytes = bytes_per_step(model, config, batch, prompt)
                row["bytes_per_step_gb"] = step_bytes / 1e9
                if bandwidth:
                    row["bandwidth_limit_tok_s"] = batch * bandwidth / step_bytes
                    row["fraction_of_bandwidth_limit"] = (
                        row["decode_tok_s"] / row["bandwidth_limit_tok_s"]
                    )
                runs.append(row)
                print(json.dumps(row), flush=True)
    for row in runs:
        base = [
            r
            for r in runs
            if r["impl"] == "mlx-lm" and (r["batch"], r["prompt"]) == (row["batch"], row["prompt"])
        ]
        if base and row["impl"] != "mlx-lm":
            row["decode_ratio_vs_mlx_lm"] = row["decode_tok_s"] / base[0]["decode_tok_s"]
            # Per round (the two ran back to back): less sensitive to load drift.
            paired = [
                a / b
                for a, b in zip(row["decode_tok_s_all"], base[0]["decode_tok_s_all"], strict=True)
            ]
            row["decode_ratio_vs_mlx_lm_paired"] = statistics.median(paired)
            if "prefill_tok_s" in row and "prefill_tok_s" in base[0]:
                row["prefill_ratio_vs_mlx_lm"] = row["prefill_tok_s"] / base[0]["prefill_tok_s"]
    results = {"meta": meta, "runs": runs, "errors": errors}
    out = Path(args.out) if args.out else RESULTS / f"decode_{args.preset}_{args.bits}bit"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{'impl':24} {'batch':>5} {'prompt':>6} {'decode':>9} {'ratio':>6} {'paired':>6} "
        f"{'prefill':>9} {'ratio':>6} {'ttft_s':>7} {'peakGB':>7} {'bw%':>5} {'step_ms':>7} "
        f"{'host':>6} {'build':>6}"
    )
    for r in results["runs"]:
        print(
            f"{r['impl']:24} {r['batch']:5d} {r['prompt']:6d} {r['decode_tok_s']:9.1f} "
            f"{r.get('decode_ratio_vs_mlx_lm', float('nan')):6.2f} "
            f"{r.get('decode_ratio_vs_mlx_lm_paired', float('nan')):6.2f} "
            f"{r.get('prefill_tok_s', float('nan')):9.1f} "
            f"{r.get('prefill_ratio_vs_mlx_lm', float('nan')):6.2f} "
            f"{r.get('ttft_s', float('nan')):7.3f} {r['peak_memory_gb']:7.2f} "
            f"{100 * r.get('fraction_of_bandwidth_limit', float('nan')):5.1f} "
            f"{r['step_ms']:7.2f} {r['host_ms_per_step']:6.2f} "
            f"{r.get('build_ms_per_step', float('nan')):6.2f}"
        )
    for r in results.get("errors", []):
        print(f"{r['impl']:24} {r['batch']:5d} {r['prompt']:6d} ERROR {r['error'][:300]}")


if __name__ == "__main__":
    main()

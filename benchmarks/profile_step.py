"""Where a decode step's GPU time goes: per-kernel durations under Nsight Compute (CUDA).

    ncu --profile-from-start off --graph-profiling node --metrics gpu__time_duration.sum \\
        --csv --log-file step.csv python -m benchmarks.profile_step --preset qwen3-30b-a3b \\
        --batch 8 --prompt 128
    python -m benchmarks.profile_step --summarize step.csv

The model (random weights, benchmarks/models.py) is built, its KV cache filled with random
keys/values of the prompt length, and a few decode steps run untimed (MLX JIT-compiles on
first use). Only then is the profiler switched on (cuProfilerStart) for `--steps` steps,
each evaluated on its own, so the log holds exactly those steps' kernels. `--summarize`
groups them by kernel name: count per step and microseconds per step.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import re
import time
from collections import defaultdict

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .decode import fill_cache, greedy, set_variant
from .models import PRESETS, build


def profile(args) -> None:
    project = "mlx-lm" if args.impl == "mlx-lm" else "ours"
    models, _ = build(args.preset, args.bits, args.group_size, impls=[project])
    model = models[project]
    if project == "ours":
        set_variant(model, args.impl)
    cache = make_prompt_cache(model)
    fill_cache(cache, args.batch, args.prompt, model)
    token = mx.random.randint(0, PRESETS[args.preset]["vocab_size"], (args.batch,))
    for _ in range(4):  # compile and JIT outside the profiled window
        token = greedy(model(token[:, None], cache=cache))
        mx.eval(token)
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: time the steps without a profiler
        cuda = None
    mx.synchronize()
    if cuda:
        cuda.cuProfilerStart()
    start = time.perf_counter()
    for _ in range(args.steps):
        token = greedy(model(token[:, None], cache=cache))
        mx.eval(token)
    mx.synchronize()
    if cuda:
        cuda.cuProfilerStop()
    print(json.dumps(dict(vars(args), profiled_s=time.perf_counter() - start)), flush=True)


def _rows(path: str):
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"{path}: no ncu CSV table found")
    return csv.DictReader(io.StringIO(text[start:]))


def summarize(path: str, steps: int) -> dict:
    """{kernel name: {count per step, us per step}}, largest first, plus the total."""
    total_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for row in _rows(path):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3}.get(unit, 1e-3)
        name = re.sub(r"\(.*", "", row["Kernel Name"])[:90]
        total_us[name] += value * scale
        count[name] += 1
    table = {
        name: {"per_step": count[name] / steps, "us_per_step": round(us / steps, 1)}
        for name, us in sorted(total_us.items(), key=lambda kv: -kv[1])
    }
    summary = {"total_us_per_step": round(sum(total_us.values()) / steps, 1), "kernels": table}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument(
        "--impl", default="ours", help="ours[:kernels=0][:compile=0][:router=0] or mlx-lm"
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--summarize", metavar="CSV", help="summarize an ncu CSV log instead")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.steps)
    else:
        profile(args)


if __name__ == "__main__":
    main()

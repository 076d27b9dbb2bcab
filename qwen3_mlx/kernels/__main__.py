"""`qwen3-mlx kernels` / `python -m qwen3_mlx.kernels`: each fused kernel's verdict on this GPU.

Prints, per call site: its kernels, the backend, whether they compiled and ran, the largest
relative error against the reference ops (float32 and bfloat16 check models), the verdict
and, with `--model`, one decode step's time with the call site's kernels against without
them at that model's shapes. `--recheck` checks again instead of reading the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .build import backend as launch_backend
from .check import cache_file, device_name, time_call_sites, verdicts
from .options import FLAG_KERNELS, KernelPlan


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.kernels") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--recheck", action="store_true", help="check again, ignoring the cache")
    parser.add_argument("--model", help="also time each call site at this model's shapes")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    args = parser.parse_args(argv)
    backend = launch_backend()  # the device's (or the one launched_by names)
    if backend is None:
        print("No Metal or CUDA GPU: the reference ops run, and there is nothing to check.")
        return 0
    found = verdicts(backend, recheck=args.recheck)
    times: dict[str, float] = {}
    if args.model:
        from ..loading import load_model

        model, _ = load_model(args.model, kernels=KernelPlan(backend=backend))
        passed = KernelPlan(backend=backend, **{v.flag: True for v in found if v.passed})
        times = time_call_sites(model, passed)
    if args.json:
        rows = [{**asdict(v), "time_vs_reference": times.get(v.flag)} for v in found]
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{device_name(backend)} ({backend}); verdicts in {cache_file()}")
    header = ("call site", "kernels", "compiled", "error f32", "error bf16", "verdict", "time")
    print("{:<10} {:<24} {:<9} {:<10} {:<10} {:<8} {}".format(*header))
    for v in found:
        verdict = "on" if v.passed else "off"
        ran = "yes" if v.launched else ("-" if v.note == "not used on this backend" else "no")
        print(
            f"{v.flag:<10} {'+'.join(FLAG_KERNELS[v.flag]):<24} {ran:<9} "
            f"{_fmt(v.max_error, '.1e'):<10} {_fmt(v.max_error_bf16, '.1e'):<10} {verdict:<8} "
            f"{_fmt(times.get(v.flag), '.2f') + 'x' if v.flag in times else '-'}"
            + (f"  ({v.note})" if v.note else "")
        )
    if times:
        print("time: one decode step with the call site's kernels / without (below 1: faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

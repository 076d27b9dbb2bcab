"""Peak RSS of the converter on a multi-shard checkpoint, against the checkpoint's size.

    python benchmarks/convert_memory.py [--sizes-mb 160 320] [--shard-mb 40] [--max-fraction 0.35]

Builds a random Qwen3-MoE checkpoint (fp32, saved by transformers in small shards so that each
layer's experts span shards), converts it in a child process (unquantized and 4-bit) and has
the child report its peak RSS (VmHWM). The baseline is the RSS of a child that only imports the
converter (MLX, mlx-lm, transformers...). Asserts that the conversion's own peak (peak minus
baseline) stays under `--max-fraction` of the largest checkpoint, and that it does not grow with
the checkpoint (it may move by one tensor, not by the extra size); writes the numbers to
benchmarks/results/convert_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# The child reports its own high-water mark (VmHWM) at exit: ru_maxrss from wait4() would
# include the parent's RSS at fork time, which Linux carries across exec.
CHILD = """
import sys
sys.argv = ["qwen3_mlx.convert", *sys.argv[1:]]
if len(sys.argv) > 1:
    from qwen3_mlx.convert import main
    assert main() == 0
else:
    import qwen3_mlx.convert
status = open("/proc/self/status").read().split("VmHWM:")[1]
print("VmHWM", int(status.split()[0]))
"""


def child_peak_rss_mb(args: list[str]) -> float:
    """Run the converter with `args` in a fresh process; return its peak RSS in MiB."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"convert {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split("VmHWM")[-1]) / 1024


def build_checkpoint(path: Path, size_mb: int, shard_mb: int) -> int:
    from tests.checkpoints import make_checkpoint

    hidden, inter, experts = 512, 384, 32
    per_layer = 4 * 3 * experts * hidden * inter  # fp32 expert bytes per layer
    layers = max(2, round(size_mb * 2**20 / per_layer))
    make_checkpoint(
        path,
        moe=True,
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=1024,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
        max_shard_size=f"{shard_mb}MB",
    )
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def measure(tmp: Path, size_mb: int, shard_mb: int, out_shard_mb: int) -> dict:
    src = tmp / f"src-{size_mb}"
    size = build_checkpoint(src, size_mb, shard_mb)
    result = {
        "checkpoint_mb": round(size / 2**20, 1),
        "source_shards": len(list(src.glob("*.safetensors"))),
        "runs": {},
    }
    for name, flags in {"fp32": [], "4bit": ["-q"]}.items():
        dst = tmp / f"{name}-{size_mb}"
        args = ["--hf-path", str(src), "--mlx-path", str(dst), "--no-progress"]
        peak = child_peak_rss_mb([*args, "--max-shard-size", f"{out_shard_mb}MB", *flags])
        result["runs"][name] = {"peak_rss_mb": round(peak, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[160, 320])
    parser.add_argument("--shard-mb", type=int, default=40)
    parser.add_argument("--out-shard-mb", type=int, default=40)
    parser.add_argument("--max-fraction", type=float, default=0.35)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/convert_memory.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        baseline = child_peak_rss_mb([])
        results = {
            "baseline_rss_mb": round(baseline, 1),
            "source_shard_mb": args.shard_mb,
            "output_shard_mb": args.out_shard_mb,
            "checkpoints": [
                measure(Path(tmp), size, args.shard_mb, args.out_shard_mb) for size in args.sizes_mb
            ],
        }
    for checkpoint in results["checkpoints"]:
        for run in checkpoint["runs"].values():
            run["above_baseline_mb"] = round(run["peak_rss_mb"] - baseline, 1)
            run["fraction_of_checkpoint"] = round(
                run["above_baseline_mb"] / checkpoint["checkpoint_mb"], 3
            )
    print(json.dumps(results, indent=2))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")

    largest = results["checkpoints"][-1]
    worst = max(r["fraction_of_checkpoint"] for r in largest["runs"].values())
    assert worst < args.max_fraction, (
        f"converter peak RSS above baseline is {worst:.0%} of a "
        f"{largest['checkpoint_mb']} MB checkpoint (limit {args.max_fraction:.0%})"
    )
    # Memory must not grow with the checkpoint: what is in flight is one output shard and a
    # couple of copies of the largest tensor (a layer's stacked experts), so the peak may move
    # by at most about one such tensor between checkpoint sizes.
    largest_tensor_mb = 4 * 32 * 512 * 384 / 2**20  # fp32 stacked experts (build_checkpoint)
    for checkpoint in results["checkpoints"]:
        for name, run in checkpoint["runs"].items():
            bound = args.out_shard_mb + 3 * largest_tensor_mb + 20
            assert run["above_baseline_mb"] < bound, f"{name}: {run} exceeds {bound:.0f} MB"
    first = results["checkpoints"][0]
    for name, run in largest["runs"].items():
        extra = run["peak_rss_mb"] - first["runs"][name]["peak_rss_mb"]
        assert extra < largest_tensor_mb, f"{name}: peak RSS grew {extra:.0f} MB with size"


if __name__ == "__main__":
    main()

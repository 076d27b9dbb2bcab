"""Decode speed and memory per rank of the distributed modes, on Qwen3-235B-A22B's shapes.

Random 4-bit weights (benchmarks/models.py), made directly in each rank's shard: no rank ever
holds more than its part, and no 132 GB checkpoint has to exist. Or, with --checkpoint, a real
checkpoint on disk loaded the way users load it (each rank reads only its slices).

    # 2 GPUs, one process each (NCCL), every mode; then 1 GPU holding as many layers as fit
    for p in expert tensor pipeline; do
      mlx.launch --backend nccl -n 2 python -m benchmarks.distributed --parallel $p --layers 94
    done
    python -m benchmarks.distributed --layers 60
    python -m benchmarks.distributed --plot benchmarks/results/distributed-*.json

    # two ranks on one machine (ring over localhost), from a random checkpoint on disk
    python -m benchmarks.distributed --write-checkpoint /tmp/q235-2l --layers 2
    mlx.launch -n 2 --backend ring python -m benchmarks.distributed --parallel expert \\
        --checkpoint /tmp/q235-2l

Rank 0 writes benchmarks/results/distributed-<preset>-<layers>l-<mode>-<N>r-<backend>.json:
per-rank weight bytes, MLX peak and process peak RSS, load time, prefill and decode speed (greedy,
every token all-reduced from rank 0 as in generation), and the traffic per token computed from
the shapes (qwen3_mlx.distributed.traffic_per_token).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import mlx.core as mx

from qwen3_mlx import distributed
from qwen3_mlx.cache import make_cache
from qwen3_mlx.config import ModelArgs
from qwen3_mlx.generate import forward

from .models import PRESETS, random_weights, skeleton

RESULTS = Path(__file__).with_name("results")
PRESETS_235B = {"qwen3-235b-a22b": PRESETS["qwen3-235b-a22b-1layer"]}


def config_for(preset: str, layers: int | None) -> dict:
    config = dict({**PRESETS, **PRESETS_235B}[preset])
    config["num_hidden_layers"] = layers or (
        94 if preset == "qwen3-235b-a22b" else config["num_hidden_layers"]
    )
    return config


def peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # Linux reports KiB


def build_random(config: dict, parallel: str, group, bits: int, seed: int):
    """This rank's shard with random weights: lazy skeleton → split → random local tensors."""
    model = skeleton("ours", config, bits, 64)
    distributed.shard_model(model, parallel, group)
    weights = random_weights(model, seed=seed + group.rank())
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return model


def write_checkpoint(out: Path, config: dict, bits: int) -> None:
    """A random quantized checkpoint in MLX's layout, one shard per layer (one in memory at once)."""
    import mlx.nn as nn

    from qwen3_mlx.weights import shard_name, write_index

    model = skeleton("ours", config, bits, 64)
    ends = nn.Module()  # embeddings, final norm, lm_head: one shard
    ends.embed_tokens, ends.norm = model.model.embed_tokens, model.model.norm
    parts = [("model.", ends)] + [
        (f"model.layers.{i}.", layer) for i, layer in enumerate(model.layers)
    ]
    if "lm_head" in model:
        head = nn.Module()
        head.lm_head = model.lm_head
        parts.append(("", head))
    out.mkdir(parents=True, exist_ok=True)
    shards, total = [], 0
    for i, (prefix, module) in enumerate(parts):
        weights = {prefix + k: v for k, v in random_weights(module, seed=i).items()}
        mx.save_safetensors(str(out / shard_name(i, len(parts))), weights, {"format": "mlx"})
        shards.append(list(weights))
        total += sum(v.nbytes for v in weights.values())
        del weights
    write_index(out, shards, total)
    quant = {"group_size": 64, "bits": bits}
    for i in range(config["num_hidden_layers"]):
        quant[f"model.layers.{i}.mlp.gate"] = {"group_size": 64, "bits": 8}
    (out / "config.json").write_text(json.dumps({**config, "quantization": quant}, indent=2))
    print(f"wrote {out}: {total / 1e9:.2f} GB", flush=True)


def measure(model, args, group) -> dict:
    vocab = model.args.vocab_size
    prompt = mx.random.randint(0, vocab, (1, args.prompt), key=mx.random.key(0))
    cache = make_cache(model)
    start = time.perf_counter()
    logits = forward(model, prompt, cache)
    token = distributed.share_tokens(model, mx.argmax(logits, axis=-1))
    mx.eval(token)
    prefill = time.perf_counter() - start
    times = []
    for _ in range(args.warmup + args.gen):
        start = time.perf_counter()
        logits = forward(model, token[None], cache)
        token = distributed.share_tokens(model, mx.argmax(logits, axis=-1))
        mx.eval(token)
        times.append(time.perf_counter() - start)
    decode = sorted(times[args.warmup :])[len(times[args.warmup :]) // 2]  # median step
    return {
        "prefill_tps": args.prompt / prefill,
        "decode_ms": decode * 1e3,
        "decode_tps": 1 / decode,
    }


def run(args) -> None:
    group = distributed.init()
    with distributed.session():
        mx.reset_peak_memory()
        start = time.perf_counter()
        if args.checkpoint:
            model, config = distributed.load_sharded(args.checkpoint, args.parallel, group)
            preset = Path(args.checkpoint).name
        else:
            config = config_for(args.preset, args.layers)
            model = build_random(config, args.parallel, group, args.bits, args.seed)
            preset = args.preset
        load_s = time.perf_counter() - start
        mine = [distributed.weight_bytes(model) / 1e6, mx.get_peak_memory() / 1e6, peak_rss() / 1e6]
        speed = measure(model, args, group)
        mine += [mx.get_peak_memory() / 1e6]
        per_rank = mx.distributed.all_gather(mx.array([mine], mx.float32), group=group).tolist()
        if group.rank() != 0:
            return
        n = group.size()
        margs = ModelArgs.from_dict(config)
        result = {
            "preset": preset,
            "layers": margs.num_hidden_layers,
            "bits": args.bits
            if not args.checkpoint
            else (config.get("quantization") or {}).get("bits"),
            "parallel": args.parallel if n > 1 else "none",
            "ranks": n,
            "backend": distributed.launch_info().backend,
            "device": str(mx.default_device()),
            "prompt_tokens": args.prompt,
            "load_s": load_s,
            **speed,
            "per_rank": [
                {
                    "weight_gb": w / 1e3,
                    "peak_after_load_gb": p / 1e3,
                    "peak_rss_gb": r / 1e3,
                    "peak_gb": q / 1e3,
                }
                for w, p, r, q in per_rank
            ],
            "traffic_per_token": distributed.traffic_per_token(margs, args.parallel, n)
            if n > 1
            else None,
            "command": shlex.join(
                [Path(sys.executable).name, "-m", "benchmarks.distributed", *sys.argv[1:]]
            ),
            "mlx": mx.__version__,
            "platform": platform.platform(),
        }
        out = (
            Path(args.out)
            if args.out
            else RESULTS
            / (
                f"distributed-{preset}-{margs.num_hidden_layers}l-{result['parallel']}-{n}r-{result['backend']}.json"
            )
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2), flush=True)


def plot(paths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in paths]
    labels = [f"{r['parallel']}\n{r['ranks']}×{r['backend']}\n{r['layers']} layers" for r in runs]
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 2, 4))
    ax.bar(labels, [r["decode_tps"] for r in runs])
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"{runs[0]['preset']}, {runs[0]['bits']}-bit, {runs[0]['device']}")
    fig.tight_layout()
    out = RESULTS / f"distributed-{runs[0]['preset']}.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=distributed.PARALLEL_MODES, default="expert")
    parser.add_argument("--preset", default="qwen3-235b-a22b", choices=[*PRESETS, *PRESETS_235B])
    parser.add_argument(
        "--layers", type=int, help="decoder layers (default: the preset's; 94 for 235B)"
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--gen", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint", help="load this checkpoint (sharded) instead of random weights"
    )
    parser.add_argument(
        "--write-checkpoint", metavar="DIR", help="write a random checkpoint and exit"
    )
    parser.add_argument("--out", help="result JSON path")
    parser.add_argument(
        "--plot", nargs="+", metavar="JSON", help="plot decode speed of these results"
    )
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
    elif args.write_checkpoint:
        write_checkpoint(
            Path(args.write_checkpoint), config_for(args.preset, args.layers), args.bits
        )
    else:
        run(args)


if __name__ == "__main__":
    main()

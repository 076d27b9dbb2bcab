"""Server throughput: N concurrent streaming clients (continuous batching) vs the same N one at a time.

Starts `python -m qwen3_mlx.server` on a free port, then for each concurrency level sends N chat
requests that each generate exactly --max-tokens tokens (end-of-turn tokens are suppressed with
logit_bias, so every run does the same work) and measures aggregate output tokens per second.
"Sequential" sends the same N requests one after another.

    python benchmarks/serve_concurrency.py [--model PATH] [--clients 16] [--max-tokens 128]

Writes benchmarks/results/serve_concurrency.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

PROMPTS = [
    "Hello",
    "What is 17 + 25?",
    "What is the capital of France?",
    "Name the three primary colors.",
    "Count from 1 to 10.",
    "What is the capital of Japan?",
]


def one_request(server: ServerProcess, index: int, max_tokens: int, out: list) -> None:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {"151645": -100, "151643": -100},
        "seed": index,
    }
    start = time.perf_counter()
    first = None
    usage = None
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if (
                first is None
                and chunk.get("choices")
                and chunk["choices"][0]["delta"].get("content") is not None
            ):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    out[index] = {
        "tokens": usage["completion_tokens"],
        "latency": time.perf_counter() - start,
        "ttft": (first or time.perf_counter()) - start,
    }


def run(server: ServerProcess, clients: int, max_tokens: int, concurrent: bool) -> dict:
    out: list = [None] * clients
    start = time.perf_counter()
    if concurrent:
        threads = [
            threading.Thread(target=one_request, args=(server, i, max_tokens, out))
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(clients):
            one_request(server, i, max_tokens, out)
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in out)
    return {
        "clients": clients,
        "mode": "concurrent" if concurrent else "sequential",
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "mean_latency_s": round(sum(r["latency"] for r in out) / clients, 3),
        "mean_ttft_s": round(sum(r["ttft"] for r in out) / clients, 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model directory or hub id (default: the demo model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_concurrency"
    )
    args = p.parse_args(argv)

    server_args = ["--max-concurrency", str(args.clients), "--max-queue", str(4 * args.clients)]
    if args.model:
        server_args += ["--model", args.model]
    server = ServerProcess(server_args)
    try:
        run(server, 2, 8, concurrent=True)  # warm-up (first compile, caches)
        levels = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.clients]
        if args.clients not in levels:
            levels.append(args.clients)
        results = [run(server, args.clients, args.max_tokens, concurrent=False)]
        print(json.dumps(results[-1]))
        for n in levels:
            results.append(run(server, n, args.max_tokens, concurrent=True))
            print(json.dumps(results[-1]))
        model = httpx.get(server.base + "/api/v0/models").json()["data"][0]
    finally:
        server.stop()

    sequential = results[0]
    batched = next(r for r in results[1:] if r["clients"] == args.clients)
    summary = {
        "benchmark": "serve_concurrency",
        "command": "python benchmarks/serve_concurrency.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {k: model[k] for k in ("id", "arch", "quantization", "max_context_length")},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "max_tokens_per_request": args.max_tokens,
        "speedup_batched_vs_sequential": round(
            batched["tokens_per_s"] / sequential["tokens_per_s"], 2
        ),
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(
        f"batched {batched['tokens_per_s']} tok/s vs sequential {sequential['tokens_per_s']} tok/s "
        f"({summary['speedup_batched_vs_sequential']}x) -> {args.out.with_suffix('.json')}"
    )
    return 0


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrent = [r for r in summary["runs"] if r["mode"] == "concurrent"]
    sequential = next(r for r in summary["runs"] if r["mode"] == "sequential")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["clients"] for r in concurrent],
        [r["tokens_per_s"] for r in concurrent],
        "o-",
        label="concurrent clients (continuous batching)",
    )
    ax.axhline(
        sequential["tokens_per_s"],
        color="gray",
        linestyle="--",
        label=f"{sequential['clients']} requests one at a time",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate output tokens / s")
    ax.set_title(
        f"qwen3-mlx server, {summary['model']['id']}, {summary['max_tokens_per_request']} tokens each"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

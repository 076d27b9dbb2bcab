"""`python -m qwen3_mlx.distributed split | traffic | check`."""

from __future__ import annotations

import argparse
import socket
import sys
import time

import mlx.core as mx

from ..config import ModelArgs, load_config
from ..errors import Qwen3MLXError
from ..hub import resolve_model_path
from .checkpoint import split_checkpoint
from .job import init, session
from .sharding import PARALLEL_MODES
from .traffic import QWEN3_235B_A22B, traffic_table


def _check_job(config: dict, rounds: int = 100) -> int:
    """`check`: every rank reports in, then rank 0 times the link: an all-reduce of one hidden
    vector (what tensor/expert modes do twice per layer per token) and of one token id."""
    group = init()
    with session():
        total = mx.distributed.all_sum(mx.array([1.0]), group=group).item()
        print(
            f"rank {group.rank()} of {group.size()} on {socket.gethostname()}: all_sum ok ({total:.0f})",
            flush=True,
        )
        if group.size() == 1:
            return 0
        args = ModelArgs.from_dict(config)
        timings = {}
        for name, x in (
            ("vector", mx.zeros((1, args.hidden_size), mx.bfloat16)),
            ("token", mx.zeros((1,), mx.uint32)),
        ):
            mx.eval(mx.distributed.all_sum(x, group=group))  # warm up
            start = time.perf_counter()
            for _ in range(rounds):
                x = mx.distributed.all_sum(x, group=group)
                mx.eval(x)
            timings[name] = (time.perf_counter() - start) / rounds
        if group.rank() == 0:
            vector, token = timings["vector"], timings["token"]
            layers, n = args.num_hidden_layers, group.size()
            print(
                f"all-reduce over {n} ranks: {args.hidden_size}-wide bf16 vector {vector * 1e6:.0f} µs, "
                f"one token id {token * 1e6:.0f} µs\n"
                f"communication per decoded token ({layers} layers), estimated from these:\n"
                f"  tensor / expert: {2 * layers} vector all-reduces + 1 token ≈ "
                f"{(2 * layers * vector + token) * 1e3:.1f} ms\n"
                f"  pipeline: {n - 1} hop(s) of one vector + 1 token ≲ {((n - 1) * vector + token) * 1e3:.1f} ms",
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3_mlx.distributed",
        description="Qwen3 over several machines: pre-split checkpoints, traffic tables, job check.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="pre-split a checkpoint into one folder per rank")
    split.add_argument("--model", "-m", required=True)
    split.add_argument("--ranks", "-n", type=int, required=True)
    split.add_argument("--parallel", choices=PARALLEL_MODES, required=True)
    split.add_argument("--out", "-o", required=True)
    split.add_argument("--pipeline-split", help="layers per rank, rank 0 first (e.g. 46,48)")
    traffic = sub.add_parser("traffic", help="per-token traffic and per-rank weights of each mode")
    traffic.add_argument(
        "--model", "-m", help="checkpoint directory (default: Qwen3-235B-A22B's shapes)"
    )
    traffic.add_argument("--ranks", "-n", type=int, nargs="+", default=[2, 4, 8])
    traffic.add_argument(
        "--bits", type=int, default=4, help="weight bits (0: as stored, unquantized)"
    )
    check = sub.add_parser("check", help="under mlx.launch: every rank reports in; time the link")
    check.add_argument("--model", "-m", help="model whose shapes to estimate for (default: 235B)")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            split_at = (
                [int(s) for s in args.pipeline_split.split(",")] if args.pipeline_split else None
            )
            out = split_checkpoint(
                args.model, args.out, args.ranks, args.parallel, pipeline_split=split_at
            )
            print(f"wrote {args.ranks} rank folders under {out}")
        elif args.command == "traffic":
            config = load_config(resolve_model_path(args.model)) if args.model else QWEN3_235B_A22B
            print(traffic_table(config, args.ranks, args.bits or None))
        else:
            config = load_config(resolve_model_path(args.model)) if args.model else QWEN3_235B_A22B
            return _check_job(config)
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

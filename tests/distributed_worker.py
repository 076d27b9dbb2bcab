"""One rank of a test job: `mlx.launch -n N python -m tests.distributed_worker OUT CASE...`.

Each CASE is `checkpoint_dir:parallel`. For each, this rank loads its shard, records the bytes it
holds, and runs greedy decoding through the generate module's own seams (`prefill`, `forward`)
plus `share_tokens`; rank 0 saves the tokens and every step's logits to OUT/<i>.npz, every rank
its weight bytes to OUT/rank<r>.json. `--hold` keeps decoding until killed (fault tests), after
touching OUT/ready<r>.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen3_mlx import distributed
from qwen3_mlx.cache import make_cache
from qwen3_mlx.generate import forward, prefill

# Token ids < 128: the test checkpoints' vocabulary. A 140-token chunk takes expert mode's compact
# path (280 (token, expert) pairs), the last 20 tokens and every decode step the masked one.
PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 120, 160)]
PREFILL_STEP = 140


def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    cache = make_cache(model)
    logits = prefill(model, prompt, cache, PREFILL_STEP)
    tokens, rows = [], []
    for _ in range(steps):
        token = distributed.share_tokens(model, mx.argmax(logits, axis=-1))
        mx.eval(token, logits)
        tokens.append(token.item())
        rows.append(np.array(logits[0]))
        logits = forward(model, token[None], cache)
    return tokens, np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    group = distributed.init()
    rank = group.rank()
    report = []
    with distributed.session():
        model = None
        for i, case in enumerate(args.cases):
            path, parallel = case.rsplit(":", 1)
            del model  # the previous case's weights must not count in this one's peak
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            model, _ = distributed.load_sharded(path, parallel, group)
            report.append(
                {
                    "case": case,
                    "weight_bytes": distributed.weight_bytes(model),
                    "peak_bytes": mx.get_peak_memory() - base,
                }
            )
            if args.hold:
                greedy(model, PROMPT[:20], 2)
                (out / f"ready{rank}").touch()
                while True:
                    greedy(model, PROMPT[:20], 50)
            tokens, logits = greedy(model, PROMPT, args.steps)
            if rank == 0:
                np.savez(out / f"{i}.npz", tokens=np.array(tokens), logits=logits)
        (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()

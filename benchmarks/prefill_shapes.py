"""What a prefill of a shape the process has not seen yet costs, against the same shape again.

    python -m benchmarks.prefill_shapes MODEL_DIR [--out results/prefill_shapes_<model>_<machine>]

Each row prefills `length` tokens after `offset` cached ones and times the second part alone,
first with MLX's fused attention (on CUDA, a cuDNN graph built per query/key length), then with
an explicit mask array (MLX's unfused attention). A shape's first run pays for whatever the backend
builds or compiles for it; a repeated shape shows the prefill's own speed. This is why the server
warms up its shapes at start-up, and what a new prompt length costs the first request to have it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.base as mlx_lm_base
from mlx_lm.models.cache import KVCache

import qwen3_mlx.model as model_module
from qwen3_mlx import load

# (length, offset): new shapes, a repeat of each kind, and chunks at growing offsets.
SHAPES = [
    (130, 0), (130, 0), (131, 0), (133, 0), (512, 0), (512, 512), (512, 512), (512, 1024),
    (300, 1536), (2048, 0), (2048, 0),
]  # fmt: skip


def timed_prefill(model, length: int, offset: int) -> float:
    cache = [KVCache() for _ in model.layers]
    if offset:
        model.model(mx.full((1, offset), 7, mx.int32), cache)
        mx.eval([c.state for c in cache])
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(model.model(mx.full((1, length), 5, mx.int32), cache))
    return time.perf_counter() - start


def array_mask(h, cache=None, **kwargs):
    return mlx_lm_base.create_attention_mask(h, cache, return_array=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_shapes")
    p.add_argument("model")
    p.add_argument("--out", help="output stem (default: results/prefill_shapes_<model>_<machine>)")
    args = p.parse_args(argv)
    model, _ = load(args.model)
    timed_prefill(model, 64, 0)  # the backend's kernels, once
    fused = model_module.create_attention_mask
    rows = []
    for mode, make_mask in (("fused", fused), ("array_mask", array_mask)):
        model_module.create_attention_mask = make_mask
        try:
            for length, offset in SHAPES:
                seconds = timed_prefill(model, length, offset)
                rows.append(dict(mode=mode, length=length, offset=offset, seconds=seconds))
                print(f"{mode:10s} length {length:5d} offset {offset:5d}: {seconds:.4f} s")
        finally:
            model_module.create_attention_mask = fused
    name = Path(args.model).name
    stem = args.out or str(
        Path(__file__).with_name("results") / f"prefill_shapes_{name}_{platform.node()}"
    )
    record = {
        "command": "python -m benchmarks.prefill_shapes " + " ".join(argv or []),
        "machine": platform.node(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "rows": rows,
    }
    Path(stem + ".json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stream source tensors, one at a time, through renaming, casting and quantizing into shards."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import quant, weights
from .convert_plan import EXPERT_KEY, canonical_name
from .errors import WeightsError
from .model import Model
from .weights import load_shard, shard_name, write_index


def release_memory() -> None:
    """Return freed buffers to the OS: MLX's buffer cache, then glibc's heap (Linux).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which
    tensors of a few MB come from the heap, and freed heap memory stays in RSS until trimmed.
    """
    mx.clear_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def model_tensors(
    model: Model, files: list[Path], add_prefix: bool, shard_delay: float = 0.0
) -> Iterator[tuple[str, mx.array, int]]:
    """Yield (model parameter name, tensor, source bytes consumed), one shard in memory at most.
    `shard_delay`: seconds to wait after each source shard (a test kills a run mid-way).

    Per-expert tensors are buffered by (layer, projection) until all experts have been seen,
    then stacked as mlx-lm stores them. The buffered arrays are lazy (not yet read from disk).
    """
    num_experts = model.args.num_experts
    pending: dict[tuple[str, str], dict[int, mx.array]] = {}
    for path in files:
        shard = load_shard(path)
        for name in list(shard):
            tensor = shard.pop(name)  # drop the shard's reference so memory follows the output
            key = canonical_name(name, add_prefix)
            match = EXPERT_KEY.match(key)
            if match is None:
                for out_name, out in model.sanitize({key: tensor}).items():
                    yield out_name, out, tensor.nbytes
                continue
            consumed = tensor.nbytes
            group = pending.setdefault((match[1], match[4]), {})
            group[int(match[3])] = tensor
            if len(group) == num_experts:
                del pending[(match[1], match[4])]
                stacked = mx.stack([group.pop(e) for e in range(num_experts)])
                del tensor  # only `stacked` may keep the experts alive once it is evaluated
                yield f"{match[1]}.switch_mlp.{match[4]}.weight", stacked, consumed
            else:
                yield "", tensor, tensor.nbytes  # nothing to write yet; progress only
        del shard
        release_memory()
        if shard_delay:
            time.sleep(shard_delay)
    if pending:  # check_against_config makes this unreachable for consistent checkpoints
        (prefix, proj), group = next(iter(pending.items()))
        raise WeightsError(f"{prefix}.experts.*.{proj}: only {len(group)} of {num_experts} found")


class ShardWriter:
    """Accumulates evaluated tensors and writes a shard whenever `max_bytes` is reached.

    Shards get provisional names; `finish()` renames them to model-0000N-of-0000M once the
    count is known and writes the index.
    """

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: dict[str, mx.array] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: mx.array) -> None:
        if self.current and self.current_bytes + tensor.nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor
        self.current_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _part(self, i: int) -> Path:
        return self.out_dir / f"part-{i + 1:05d}.safetensors"

    def flush(self) -> None:
        if not self.current:
            return
        path = self._part(len(self.shards))
        weights.save_safetensors(path, self.current, metadata={"format": "mlx"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0
        release_memory()

    def finish(self) -> None:
        self.flush()
        for i in range(len(self.shards)):
            self._part(i).rename(self.out_dir / shard_name(i, len(self.shards)))
        write_index(self.out_dir, self.shards, self.total_bytes)


def convert_tensors(
    model: Model,
    files: list[Path],
    writer: ShardWriter,
    *,
    dtype: mx.Dtype | None,
    settings: dict[str, dict[str, Any]],
    add_prefix: bool,
    total_bytes: int,
    progress: bool,
    shard_delay: float = 0.0,
) -> int:
    """Stream every tensor into `writer`; return the number of model parameters written."""
    stream = model_tensors(model, files, add_prefix, shard_delay)
    return write_tensors(
        stream, writer, dtype=dtype, settings=settings, total_bytes=total_bytes, progress=progress
    )


def write_tensors(
    stream: Iterator[tuple[str, mx.array, int]],
    writer: ShardWriter,
    *,
    dtype: mx.Dtype | None,
    settings: dict[str, dict[str, Any]],
    total_bytes: int,
    progress: bool,
) -> int:
    """Cast, quantize and write each (name, tensor, source bytes) of `stream` (a "" name is
    progress only); the step HF and GGUF sources share. Returns the parameters written."""
    from tqdm import tqdm

    parameters = 0
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="Converting", disable=not progress
    ) as bar:
        for name, tensor, consumed in stream:
            if name:
                if dtype is not None and mx.issubdtype(tensor.dtype, mx.floating):
                    tensor = tensor.astype(dtype)
                parameters += tensor.size
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module in settings:
                    outputs = {
                        f"{module}.{k}": v
                        for k, v in quant.quantize_weight(tensor, settings[module]).items()
                    }
                else:
                    outputs = {name: tensor}
                mx.eval(*outputs.values())  # one tensor at a time: bounded memory
                del tensor
                for out_name, out in outputs.items():
                    writer.add(out_name, out)
                mx.clear_cache()  # freed inputs would otherwise stay in MLX's buffer cache
            bar.update(consumed)
    return parameters

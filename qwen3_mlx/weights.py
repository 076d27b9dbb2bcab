"""Checkpoint files: find shards, validate them, load them into a model, save them.

Shards are validated before MLX touches them (header length, JSON header, every tensor's byte
range inside the file) so a truncated download or a corrupt file gives a message naming the file
instead of a crash deep inside the loader.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ConvertError, Qwen3MLXError, WeightsError

INDEX_FILE = "model.safetensors.index.json"
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def shard_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors shards, in order; the index (if any) must match the files."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: invalid index file ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise WeightsError(
                f"{model_dir}: missing shard {missing[0]} (listed in {INDEX_FILE})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors files found")
    return files


def read_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header; return {name: {dtype, shape, data_offsets}}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise WeightsError(
                f"{path}: truncated or corrupt safetensors file "
                f"(header claims {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            nbytes = DTYPE_SIZES[info["dtype"]]
            for d in info["shape"]:
                nbytes *= d
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which holds only {data_size} bytes"
            )
        if end - start != nbytes:
            raise WeightsError(
                f"{path}: corrupt: tensor {name!r} has {end - start} bytes, expected {nbytes}"
            )
    return header


def load_shard(path: Path) -> dict[str, mx.array]:
    read_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises plain RuntimeError/ValueError for unreadable files
        raise WeightsError(f"{path}: cannot read safetensors file ({e})") from None


def iter_shards(model_dir: str | Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    """Yield (path, tensors) one shard at a time, so memory stays bounded by the largest shard."""
    for path in shard_files(model_dir):
        yield path, load_shard(path)


def check_and_load(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load `weights` into `model` strictly: every parameter present, every shape right."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise WeightsError(
            f"{source}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise WeightsError(
            f"{source}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " — does config.json match these weights?"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)


def save_shards(
    weights: dict[str, mx.array], out_dir: Path, *, max_shard_bytes: int = 5 << 30
) -> None:
    """Write weights as mlx-lm does: model-0000N-of-0000M.safetensors + index."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    write_index(out_dir, [list(s) for s in shards], sum(w.nbytes for w in weights.values()))
    for i, shard in enumerate(shards):
        mx.save_safetensors(
            str(out_dir / shard_name(i, len(shards))), shard, metadata={"format": "mlx"}
        )


def save_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """mx.save_safetensors through a Python file object, so that a failed write raises OSError
    with its errno (MLX's own file writer raises "[write] Unable to write N bytes", no cause).
    MLX hands each tensor's buffer to the file as a memoryview: no copy, same speed."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, tensors, metadata=metadata)


def file_error(e: OSError, out: Path, src: Path) -> Qwen3MLXError:
    """One line for an OSError met while writing `out` from `src`: "OUT: cannot write (no space
    left on device)", "OUT: cannot write (read-only file system)"... A failure to open or read a
    file of `src` names that file instead."""
    text = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
    cause = text[:1].lower() + text[1:]
    if isinstance(e.filename, str) and not e.filename2 and Path(e.filename).is_relative_to(src):
        return WeightsError(f"{e.filename}: cannot read ({cause})")
    return ConvertError(f"{out}: cannot write ({cause})")


def unwritable_reason(directory: Path) -> str | None:
    """Why `directory` (made if missing) can't get new files, or None. Looks at the nearest
    existing ancestor; root is refused by a read-only mount too. Free space isn't checked."""
    base = next(p for p in (directory, *directory.parents) if p.exists() or p.is_symlink())
    if not base.is_dir():
        return f"{base} is not a directory"
    if os.access(base, os.W_OK | os.X_OK):
        return None
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        return "read-only file system"
    return "permission denied"


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_index(out_dir: Path, shard_keys: list[list[str]], total_size: int) -> None:
    weight_map = {
        name: shard_name(i, len(shard_keys)) for i, keys in enumerate(shard_keys) for name in keys
    }
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=4))

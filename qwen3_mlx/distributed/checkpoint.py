"""Loading only this rank's slices of a checkpoint, and pre-splitting a checkpoint per rank."""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import load_config
from ..errors import DistributedError, WeightsError
from ..hub import resolve_model_path
from ..loading import apply_quantization, build_model, prepare_for_inference, quantization_of
from ..model import Model
from ..weights import INDEX_FILE, check_and_load, read_header, shard_files, shard_name, write_index
from .job import init
from .sharding import Slice, check_shardable, quant_group_size, rank_slices, shard_model

SPLIT_MANIFEST = "distributed.json"


NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
    "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


@dataclass
class TensorRef:
    """A tensor inside a safetensors file, not read yet."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file

    def read(self, part: Slice | None, files: dict[Path, dict]) -> mx.array:
        if part is None:  # mx.load is lazy: only this tensor's bytes are read, on eval
            if self.path not in files:
                files[self.path] = mx.load(str(self.path))
            return files[self.path].pop(self.name)  # the dict must not keep it alive
        if self.dtype not in NUMPY_DTYPES:
            raise WeightsError(
                f"{self.path}: tensor {self.name}: dtype {self.dtype} can't be split"
            )
        axis = part.axis % len(self.shape)
        n = self.shape[axis]
        if n % part.parts:
            raise DistributedError(
                f"{self.path}: tensor {self.name} has {n} entries along axis {axis}, "
                f"which don't split into {part.parts} equal parts"
            )
        step = n // part.parts
        index = [slice(None)] * len(self.shape)
        index[axis] = slice(part.part * step, (part.part + 1) * step)
        mapped = np.memmap(
            self.path,
            dtype=NUMPY_DTYPES[self.dtype],
            mode="r",
            offset=self.offset,
            shape=self.shape,
        )
        array = mx.array(np.ascontiguousarray(mapped[tuple(index)]))
        del mapped
        return array.view(mx.bfloat16) if self.dtype == "BF16" else array


class Checkpoint:
    """A checkpoint's tensors by model parameter name, read on demand (slices from disk only)."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.tensors: dict[str, TensorRef] = {}
        self.files: dict[Path, dict] = {}
        for path in shard_files(model_dir):
            header = read_header(path)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start = 8 + header_len + info["data_offsets"][0]
                self.tensors[name] = TensorRef(
                    path, name, info["dtype"], tuple(info["shape"]), start
                )
        if any(k.startswith("layers.") for k in self.tensors):  # saved from the bare body
            self.tensors = {
                (k if k.startswith(("model.", "lm_head.")) else f"model.{k}"): v
                for k, v in self.tensors.items()
            }
        # Hugging Face layout: one tensor per expert, "<layer>.mlp.experts.<e>.<proj>.weight".
        self.experts: dict[tuple[str, str], int] = {}
        for k in self.tensors:
            m = re.fullmatch(r"(.*\.mlp)\.experts\.\d+\.(\w+)\.weight", k)
            if m:
                self.experts[m[1], m[2]] = self.experts.get((m[1], m[2]), 0) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:  # shapes for loading.apply_quantization
        return self.tensors[name]

    def read(self, name: str, part: Slice | None) -> mx.array:
        if name in self.tensors:
            return self.tensors[name].read(part, self.files)
        # Hugging Face layout: one tensor per expert; the model stacks them (E, out, in).
        m = re.fullmatch(r"(.*\.mlp)\.switch_mlp\.(\w+)\.weight", name)
        experts = self.experts.get((m[1], m[2]), 0) if m else 0
        if experts:
            chosen, inner = range(experts), None
            if part is not None and part.axis % 3 == 0:  # expert parallel: only this rank's experts
                step = experts // part.parts
                chosen = range(part.part * step, (part.part + 1) * step)
            elif part is not None:  # tensor parallel: the same slice of every expert
                inner = Slice(part.axis - 1 if part.axis > 0 else part.axis, part.part, part.parts)
            refs = [self.tensors[f"{m[1]}.experts.{e}.{m[2]}.weight"] for e in chosen]
            return mx.stack([ref.read(inner, self.files) for ref in refs])
        raise WeightsError(f"{self.dir}: missing tensor {name}")


# -- loading ---------------------------------------------------------------------------------------------


def _rank_directory(
    model_dir: Path, parallel: str, rank: int, size: int
) -> tuple[Path, dict | None]:
    """A pre-split checkpoint (`split`: its root, or one rank's folder) → this rank's folder and
    how it was split; any other checkpoint → itself and None."""
    manifest_path = model_dir / SPLIT_MANIFEST
    if manifest_path.exists():
        split, where = json.loads(manifest_path.read_text()), manifest_path
        model_dir = model_dir / f"rank-{rank}"
        if not (model_dir / "config.json").exists():
            raise DistributedError(
                f"{model_dir}: missing on this machine; copy the split's rank-{rank} folder here"
            )
    else:
        config_path = model_dir / "config.json"
        split = (
            json.loads(config_path.read_text()).get("distributed") if config_path.exists() else None
        )
        where = config_path
        if split is None:
            return model_dir, None
        if split.get("rank") != rank:
            raise DistributedError(
                f"{model_dir}: the folder of rank {split.get('rank')}, not of rank {rank}"
            )
    if split.get("ranks") != size or split.get("parallel") != parallel:
        raise DistributedError(
            f"{where}: split for {split.get('ranks')} ranks with --parallel "
            f"{split.get('parallel')}, but this job runs {size} ranks with --parallel {parallel}"
        )
    return model_dir, split


def model_directory(path_or_id: str | Path, parallel: str, group: Any = None) -> Path:
    """The folder this rank reads config, tokenizer and weights from (a split's rank-<r> folder)."""
    group = group if group is not None else init()
    model_dir = resolve_model_path(path_or_id)
    return _rank_directory(model_dir, parallel, group.rank(), group.size())[0]


def _model_skeleton(config: dict, checkpoint: Checkpoint, source: str) -> Model:
    """The full model with lazy (never evaluated) random weights, quantized as the checkpoint is."""
    model = build_model(config, source)
    quantization = quantization_of(config)
    if quantization and any(k.endswith(".scales") for k in checkpoint.tensors):
        apply_quantization(model, quantization, checkpoint, source)
    return model


def load_sharded(
    path_or_id: str | Path,
    parallel: str,
    group: Any = None,
    *,
    long_context: bool = False,
    pipeline_split: list[int] | None = None,
) -> tuple[Model, dict[str, Any]]:
    """Load this rank's part of a checkpoint (full or pre-split) → (sharded model, config)."""
    group = group if group is not None else init()
    rank, size = group.rank(), group.size()
    model_dir, manifest = _rank_directory(resolve_model_path(path_or_id), parallel, rank, size)
    if manifest:
        pipeline_split = manifest.get("pipeline_split")
    config = load_config(model_dir)
    if long_context:
        from ..cache import enable_long_context

        config = enable_long_context(config)
    source = str(model_dir / "config.json")
    checkpoint = Checkpoint(model_dir)
    model = _model_skeleton(config, checkpoint, source)
    names = [name for name, _ in tree_flatten(model.parameters())]
    plan = rank_slices(names, model.args, parallel, rank, size, pipeline_split)
    shard_model(model, parallel, group, pipeline_split=pipeline_split)
    weights = {}
    for name, part in plan.items():  # a pre-split folder holds this rank's tensors, already cut
        weights[name] = checkpoint.read(name, None if manifest else part)
        mx.eval(weights[name])  # one tensor at a time: peak memory stays near the shard's size
    check_and_load(model, weights, str(model_dir))
    model.eval()
    return model, config


def load(path_or_id: str | Path, parallel: str, group: Any = None, *, long_context: bool = False):
    """Like `qwen3_mlx.load`, sharded: (model, tokenizer) on every rank of the job."""
    from ..tokenizer import load_tokenizer

    group = group if group is not None else init()
    model, _ = load_sharded(path_or_id, parallel, group, long_context=long_context)
    prepare_for_inference(model)
    return model, load_tokenizer(model_directory(path_or_id, parallel, group))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this process holds."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


# -- pre-splitting a checkpoint ------------------------------------------------------------------------


def split_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    ranks: int,
    parallel: str,
    *,
    pipeline_split: list[int] | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write `out_dir/rank-{r}/` for every rank: config, tokenizer and only that rank's tensors.

    Copy `out_dir/distributed.json` and a machine's own `rank-{r}` folders to each machine; point
    `--model` at `out_dir` there."""
    model_dir, out_dir = resolve_model_path(model_dir), Path(out_dir)
    if (model_dir / SPLIT_MANIFEST).exists():
        raise DistributedError(f"{model_dir}: already a split checkpoint")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DistributedError(f"{out_dir}: exists and is not empty")
    config = load_config(model_dir)
    checkpoint = Checkpoint(model_dir)
    model = _model_skeleton(config, checkpoint, str(model_dir / "config.json"))
    check_shardable(model.args, parallel, ranks, quant_group_size(model))
    names = [name for name, _ in tree_flatten(model.parameters())]
    quantized = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        for path, m in model.named_modules()
        if hasattr(m, "bits")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(ranks):
        rank_dir = out_dir / f"rank-{rank}"
        rank_dir.mkdir()
        for item in model_dir.iterdir():
            if (
                item.is_file()
                and not item.name.endswith(".safetensors")
                and item.name != INDEX_FILE
            ):
                shutil.copy2(item, rank_dir / item.name)
        raw = json.loads((model_dir / "config.json").read_text())
        raw["distributed"] = {
            "parallel": parallel,
            "ranks": ranks,
            "rank": rank,
            "pipeline_split": pipeline_split,
        }
        if quantized:  # every module's settings spelled out: cut tensors' shapes would mislead
            key = "quantization" if "quantization" in raw else "quantization_config"
            raw[key] = {**raw[key], **quantized}
        (rank_dir / "config.json").write_text(json.dumps(raw, indent=2))
        plan = rank_slices(names, model.args, parallel, rank, ranks, pipeline_split)
        _write_shards(
            rank_dir, ((n, checkpoint.read(n, part)) for n, part in plan.items()), max_shard_bytes
        )
        checkpoint.files.clear()
    manifest = {
        "parallel": parallel,
        "ranks": ranks,
        "pipeline_split": pipeline_split,
        "source": str(model_dir),
    }
    (out_dir / SPLIT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out_dir


def _write_shards(out_dir: Path, tensors, max_shard_bytes: int) -> None:
    """Stream tensors into shards of at most `max_shard_bytes` (one shard in memory at a time)."""
    shards: list[list[str]] = []
    current: dict[str, mx.array] = {}
    total = 0

    def flush():
        if current:
            mx.save_safetensors(
                str(out_dir / f"part-{len(shards)}.safetensors"),
                current,
                metadata={"format": "mlx"},
            )
            shards.append(list(current))
            current.clear()

    size = 0
    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    for i in range(len(shards)):
        (out_dir / f"part-{i}.safetensors").rename(out_dir / shard_name(i, len(shards)))
    write_index(out_dir, shards, total)

"""Check a source checkpoint before conversion: shard headers, tensor names and shapes, dtype."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import ConvertError, WeightsError
from .model import Model
from .weights import read_header, shard_files

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# One tensor per expert, as Hugging Face stores MoE layers; mlx-lm stacks them per projection.
EXPERT_KEY = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(\w+_proj)\.weight$")

Headers = dict[str, tuple[Path, tuple[int, ...], int]]


def check_source_not_quantized(config: dict[str, Any], src: Path) -> None:
    """Refuse an already-quantized source: re-quantizing it would compound the rounding error."""
    source_quant = config.get("quantization") or config.get("quantization_config")
    if source_quant:
        method = source_quant.get("quant_method", "mlx") if isinstance(source_quant, dict) else "?"
        raise ConvertError(
            f"{src / 'config.json'}: the source is already quantized ({method}); "
            "convert from the bf16 release"
        )


def output_dtype_name(dtype: str | None, config: dict[str, Any]) -> str | None:
    """Floating tensors' output dtype: `--dtype`, else config.json's, else None (as stored)."""
    dtype_name = dtype or config.get("torch_dtype") or config.get("dtype")
    if dtype_name not in DTYPES:
        return None  # keep each tensor's own dtype, as mlx-lm does
    return dtype_name


def read_source_headers(src: Path) -> tuple[list[Path], Headers]:
    """{tensor name: (shard, shape, nbytes)} over all shards; validates every shard's header."""
    files = shard_files(src)
    tensors: Headers = {}
    for path in files:
        for name, info in read_header(path).items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise WeightsError(f"{path}: tensor {name} is also in {tensors[name][0].name}")
            start, end = info["data_offsets"]
            tensors[name] = (path, tuple(info["shape"]), end - start)
    return files, tensors


def body_only(names) -> bool:
    """Qwen3-Embedding checkpoints are saved from the bare body: no "model." prefix."""
    return any(n.startswith("layers.") for n in names)


def canonical_name(name: str, add_prefix: bool) -> str:
    """`name` as the full model names it: "model." added to a bare body's tensors."""
    if add_prefix and not name.startswith(("model.", "lm_head.")):
        return f"model.{name}"
    return name


def check_against_config(model: Model, tensors: Headers, src: Path) -> None:
    """Run model.sanitize over shape-only placeholders and compare with the model's parameters."""
    prefix = body_only(tensors)
    origin = {}  # sanitized name -> the shard it comes from, so errors name the file
    placeholders = {}
    for name, (path, shape, _) in tensors.items():
        key = canonical_name(name, prefix)
        placeholders[key] = mx.zeros(shape)  # lazy: never evaluated, only its shape is used
        match = EXPERT_KEY.match(key)
        target = f"{match[1]}.switch_mlp.{match[4]}.weight" if match else key
        origin.setdefault(target, path)
    try:
        sanitized = model.sanitize(placeholders)
    except KeyError as e:  # an expert group with a missing member
        raise WeightsError(f"{src}: missing tensor {e.args[0]}") from None
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = [k for k in expected if k not in sanitized]
    if missing:
        raise WeightsError(
            f"{src}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for name, value in sanitized.items():
        where = origin.get(name, src)
        if name not in expected:
            raise WeightsError(f"{where}: unexpected tensor {name} — does config.json match?")
        if tuple(value.shape) != tuple(expected[name]):
            raise WeightsError(
                f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                f"config.json implies {tuple(expected[name])}"
            )

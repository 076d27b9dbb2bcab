"""`--dequantize`: a quantized MLX checkpoint (ours or mlx-lm's, any mode) → a float checkpoint.

As `mlx_lm.convert --dequantize` does, with the converter's guarantees:

* Fail before work. Every quantized module's settings (config.json's entry, else recovered from
  the stored shapes as the loader does) are checked against its packed shapes, and the float
  tensors it will write against config.json, before the first byte is written.
* Bounded memory. Source shards are read one at a time; a module's weight, scales and biases
  may sit in different shards, so only incomplete modules are buffered, lazy (unread), until
  their last part arrives. Each float weight is evaluated and written on its own, through the
  converter's ShardWriter and inside its staged (crash-safe) output.

The output config.json is the source's without "quantization" / "quantization_config".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import quant
from .config import ModelArgs
from .convert_output import staged_output, write_side_files
from .convert_plan import (
    DTYPES,
    Headers,
    body_only,
    canonical_name,
    check_against_config,
    output_dtype_name,
    read_source_headers,
)
from .convert_stream import ShardWriter, release_memory, write_tensors
from .errors import ConvertError, WeightsError
from .model import Model
from .weights import load_shard

QUANT_PARTS = ("weight", "scales", "biases")
# {module path: (its settings, how many of QUANT_PARTS it stores: 3 affine, 2 the float modes)}
Plan = dict[str, tuple[dict[str, Any], int]]


def split_config(config: dict[str, Any], src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the checkpoint's MLX "quantization" dict, config.json without quantization)."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        other = config.get("quantization_config")
        if isinstance(other, dict) and other.get("quant_method"):
            raise ConvertError(
                f"{src / 'config.json'}: quantized by {other['quant_method']!r}, not by MLX; "
                "--dequantize reads MLX checkpoints"
            )
        raise ConvertError(
            f"{src / 'config.json'}: not quantized (no 'quantization'); nothing to dequantize"
        )
    rest = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return quantization, rest


def plan_modules(model: Model, quantization: dict[str, Any], tensors: Headers) -> Plan:
    """Every quantized module of the checkpoint with its settings, checked against its shapes."""
    in_dims = {path: m.weight.shape[-1] for path, m in quant.quantizable_modules(model)}
    plan: Plan = {}
    for name, (where, _, _) in tensors.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        if module not in in_dims or f"{module}.weight" not in tensors:
            raise WeightsError(f"{where}: unexpected tensor {name} — does config.json match?")
        if f"{module}.global_scale" in tensors:
            raise ConvertError(f"{where}: {module} has a global_scale (nvfp4): not supported")
        packed, scales = tensors[f"{module}.weight"][1], tensors[name][1]
        has_biases = f"{module}.biases" in tensors
        try:
            setting = quant.named_settings(quantization, module) or quant.inferred_settings(
                module, in_dims[module], packed[-1], scales[-1], has_biases
            )
        except ValueError as e:
            raise WeightsError(f"{where}: {e}") from None
        bits, group, n = setting["bits"], setting["group_size"], in_dims[module]
        if packed[-1] * 32 != n * bits or scales[-1] * group != n:
            raise WeightsError(
                f"{where}: {module} is stored as {tuple(packed)} with scales {tuple(scales)}, "
                f"not {setting['mode']} {bits}-bit groups of {group} over {n} inputs"
            )
        plan[module] = (setting, 3 if has_biases else 2)
    return plan


def float_headers(model: Model, tensors: Headers, plan: Plan) -> Headers:
    """The tensors the output will hold, with the float shapes (for check_against_config)."""
    in_dims = {path: m.weight.shape[-1] for path, m in quant.quantizable_modules(model)}
    out: Headers = {}
    for name, (where, shape, nbytes) in tensors.items():
        module, _, part = name.rpartition(".")
        if module in plan and part in QUANT_PARTS:
            if part == "weight":
                out[name] = (where, (*shape[:-1], in_dims[module]), nbytes)
            continue
        out[name] = (where, shape, nbytes)
    return out


def dequantized_tensors(
    files: list[Path], plan: Plan, add_prefix: bool, dtype: mx.Dtype | None
) -> Iterator[tuple[str, mx.array, int]]:
    """Yield (name, tensor, source bytes) as convert_stream.write_tensors takes them: float
    tensors as stored, each quantized module's weight dequantized once all its parts are seen."""
    pending: dict[str, dict[str, mx.array]] = {}
    for path in files:
        shard = load_shard(path)
        for stored in list(shard):
            tensor = shard.pop(stored)  # drop the shard's reference so memory follows the output
            name = canonical_name(stored, add_prefix)
            module, _, part = name.rpartition(".")
            if module not in plan or part not in QUANT_PARTS:
                yield name, tensor, tensor.nbytes
                continue
            consumed = tensor.nbytes
            parts = pending.setdefault(module, {})
            parts[part] = tensor
            del tensor
            setting, count = plan[module]
            if len(parts) < count:
                yield "", parts[part], consumed  # nothing to write yet; progress only
                continue
            del pending[module]
            weight = mx.dequantize(
                parts.pop("weight"),
                parts.pop("scales"),
                parts.pop("biases", None),
                group_size=setting["group_size"],
                bits=setting["bits"],
                mode=setting["mode"],
                dtype=dtype,  # None: the scales' dtype (affine), else MLX's default (bfloat16)
            )
            yield f"{module}.weight", weight, consumed
        del shard
        release_memory()
    if pending:  # plan_modules makes this unreachable for consistent checkpoints
        raise WeightsError(f"{next(iter(pending))}: a quantized part is missing")


def dequantize_checkpoint(
    src: Path,
    dst: Path,
    config: dict[str, Any],
    *,
    dtype: str | None,
    max_bytes: int,
    progress: bool,
) -> Path:
    """Write the float checkpoint of quantized `src` at `dst` (see the module docstring)."""
    quantization, config = split_config(config, src)
    model = Model(ModelArgs.from_dict(config, str(src / "config.json")))  # lazy: shapes only
    files, stored = read_source_headers(src)
    add_prefix = body_only(stored)
    tensors = {canonical_name(k, add_prefix): v for k, v in stored.items()}
    plan = plan_modules(model, quantization, tensors)
    check_against_config(model, float_headers(model, tensors, plan), src)
    dtype_name = output_dtype_name(dtype, config)
    total_bytes = sum(nbytes for _, _, nbytes in tensors.values())
    modes = sorted({setting["mode"] for setting, _ in plan.values()})
    print(
        f"[INFO] {src} -> {dst}: {len(files)} source shard(s), {total_bytes / 2**30:.2f} GiB, "
        f"dequantizing {len(plan)} modules ({', '.join(modes)}) to {dtype_name or 'as stored'}",
        flush=True,
    )
    with staged_output(dst, src) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        out_dtype = DTYPES.get(dtype_name)
        parameters = write_tensors(
            dequantized_tensors(files, plan, add_prefix, out_dtype),
            writer,
            dtype=out_dtype,
            settings={},
            total_bytes=total_bytes,
            progress=progress,
        )
        writer.finish()
        write_side_files(src, tmp, config, dtype_name, None)
    print(
        f"[INFO] Wrote {dst}: {len(writer.shards)} shard(s), "
        f"{writer.total_bytes / 2**30:.2f} GiB, {parameters:,} parameters",
        flush=True,
    )
    return dst

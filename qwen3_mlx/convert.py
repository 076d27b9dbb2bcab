"""Convert a Hugging Face Qwen3 checkpoint to MLX (mlx-lm's on-disk layout), optionally quantized.

    python -m qwen3_mlx.convert --hf-path Qwen/Qwen3-8B --mlx-path Qwen3-8B-4bit -q

Flags follow `mlx_lm.convert`. Three properties matter for checkpoints of hundreds of GB:

* Bounded memory. Source shards are read one at a time (MLX loads safetensors lazily, tensor by
  tensor), each tensor is renamed, cast, quantized and evaluated on its own, and output shards
  are flushed as soon as they reach `--max-shard-size`. MoE experts are stored one tensor per
  expert and may span shards: only incomplete (layer, projection) groups are buffered, and those
  stay lazy (unread) until the group is complete and stacked.
* Fail before work. All shard headers are read and every tensor name and shape is checked
  against config.json before the first byte is written.
* Crash-safe. Everything is written to a hidden directory beside the destination and renamed
  into place at the end; a killed run leaves no directory that looks like a model, and a failed
  write (disk full, read-only) is removed and reported in one line.

This module is the entry point and runs the steps in order; each step lives in its own module:
convert_cli (flags), convert_plan (checks before any write), convert_stream (tensors → shards),
convert_output (destination, side files, atomic rename); convert_dequantize (`--dequantize`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import quant
from .config import ModelArgs, load_config
from .convert_cli import DEFAULT_MAX_SHARD_SIZE, configure_parser, parse_size
from .convert_dequantize import dequantize_checkpoint
from .convert_output import check_destination, staged_output, write_side_files
from .convert_plan import (
    DTYPES,
    body_only,
    check_against_config,
    check_source_not_quantized,
    output_dtype_name,
    read_source_headers,
)
from .convert_stream import ShardWriter, convert_tensors
from .errors import ConvertError, Qwen3MLXError
from .hub import MODEL_PATTERNS, resolve_model_path
from .model import Model

# What other code imports from here (the CLIs call main).
__all__ = ["DEFAULT_MAX_SHARD_SIZE", "configure_parser", "convert", "main"]


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    q_mode: str = "affine",
    dtype: str | None = None,
    quant_recipe: str | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    shard_delay: float = 0.0,
    dequantize: bool = False,
) -> Path:
    """Convert `hf_path` (directory or hub id) into an MLX checkpoint at `mlx_path`.

    Same arguments as `mlx_lm.convert` (plus `quant_recipe`, which implies `quantize`, and
    `force`; `shard_delay`: seconds to wait after each source shard, for tests that stop a run
    mid-way). `dequantize`: `hf_path` is a quantized MLX checkpoint, written back as float
    (convert_dequantize). Returns the destination directory.
    """
    dst = Path(mlx_path).expanduser()
    if quant_recipe is not None:
        quantize = True
    if quantize and dequantize:
        raise ConvertError("-q/--quant-recipe and --dequantize: choose one")
    if quantize:
        bits, group_size, recipe = quant.validate_settings(
            q_bits, q_group_size, q_mode, quant_recipe
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    check_destination(dst, None, force)  # fail before downloading anything

    src = resolve_model_path(hf_path, allow_patterns=[*MODEL_PATTERNS, "*.md", "LICENSE*"])
    check_destination(dst, src, force)
    config = load_config(src)
    if dequantize:
        return dequantize_checkpoint(
            src, dst, config, dtype=dtype, max_bytes=max_bytes, progress=progress
        )
    check_source_not_quantized(config, src)
    args = ModelArgs.from_dict(config, str(src / "config.json"))
    model = Model(args)  # parameters stay lazy: only names and shapes are used

    files, tensors = read_source_headers(src)
    check_against_config(model, tensors, src)
    add_prefix = body_only(tensors)
    total_bytes = sum(nbytes for _, _, nbytes in tensors.values())

    dtype_name = output_dtype_name(dtype, config)
    settings, quantization = {}, None
    if quantize:
        settings, quantization = quant.plan_quantization(model, bits, group_size, recipe, q_mode)

    what = f"quantized: {quant.describe(settings)}" if quantize else "not quantized"
    print(
        f"[INFO] {src} -> {dst}: {len(files)} source shard(s), {total_bytes / 2**30:.2f} GiB, "
        f"dtype {dtype_name or 'as stored'}, {what}",
        flush=True,
    )
    # Every write happens in `staged_output`: nothing reaches `dst` unless all of it succeeds.
    with staged_output(dst, src) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        parameters = convert_tensors(
            model,
            files,
            writer,
            dtype=DTYPES.get(dtype_name),
            settings=settings,
            add_prefix=add_prefix,
            total_bytes=total_bytes,
            progress=progress,
            shard_delay=shard_delay,
        )
        writer.finish()
        write_side_files(src, tmp, config, dtype_name, quantization)
    bpw = 8 * writer.total_bytes / max(parameters, 1)
    print(
        f"[INFO] Wrote {dst}: {len(writer.shards)} shard(s), "
        f"{writer.total_bytes / 2**30:.2f} GiB, {bpw:.3f} bits per weight",
        flush=True,
    )
    return dst


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.convert") -> int:
    args = configure_parser(prog).parse_args(argv)
    options = vars(args)
    options["progress"] = not options.pop("no_progress")
    gguf, ollama = options.pop("gguf"), options.pop("ollama")
    try:
        if gguf or ollama:
            from .gguf_import import convert_gguf
            from .ollama_store import find_model

            del options["hf_path"]
            if options.pop("dequantize"):
                raise ConvertError("--dequantize reads a quantized MLX checkpoint (--hf-path)")
            convert_gguf(gguf or find_model(ollama), **options)
        else:
            convert(**options)
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {args.mlx_path} was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

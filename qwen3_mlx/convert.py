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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from . import quant, weights
from .config import ModelArgs, load_config, normalize_config
from .errors import ConvertError, Qwen3MLXError, WeightsError
from .hub import MODEL_PATTERNS, resolve_model_path
from .model import Model
from .weights import INDEX_FILE, load_shard, read_header, shard_files, shard_name, write_index

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # mlx-lm's shard size
# Files from the source directory that are weights (rewritten) or not worth carrying over.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
SKIP_FILES = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json"}
# Testing aid: seconds to sleep after each source shard, so a test can kill a run mid-way.
DELAY_ENV = "QWEN3_MLX_CONVERT_SHARD_DELAY"
EXPERT_KEY = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(\w+_proj)\.weight$")


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


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)I?B?\s*", str(text).upper())
    if not match:
        raise ConvertError(f"--max-shard-size {text!r} is not a size like '5GB' or '500MB'")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


# ---------------------------------------------------------------------------------------------
# Planning: read headers, check names and shapes, decide quantization. No tensor data is read.
# ---------------------------------------------------------------------------------------------


Headers = dict[str, tuple[Path, tuple[int, ...], int]]


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
    if add_prefix and not name.startswith(("model.", "lm_head.")):
        return f"model.{name}"
    return name


def check_against_config(model: Model, tensors: Headers, src: Path) -> None:
    """Run model.sanitize over shape-only placeholders and compare with the model's parameters."""
    prefix = body_only(tensors)
    origin = {}
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


# ---------------------------------------------------------------------------------------------
# Streaming: source tensors → (renamed, stacked) model tensors → cast/quantized output shards.
# ---------------------------------------------------------------------------------------------


def model_tensors(
    model: Model, files: list[Path], add_prefix: bool
) -> Iterator[tuple[str, mx.array, int]]:
    """Yield (model parameter name, tensor, source bytes consumed), one shard in memory at most.

    Per-expert tensors are buffered by (layer, projection) until all experts have been seen,
    then stacked as mlx-lm stores them. The buffered arrays are lazy (not yet read from disk).
    """
    num_experts = model.args.num_experts
    pending: dict[tuple[str, str], dict[int, mx.array]] = {}
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
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
        if delay:
            time.sleep(delay)
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
) -> int:
    """Stream every tensor into `writer`; return the number of model parameters written."""
    from tqdm import tqdm

    parameters = 0
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="Converting", disable=not progress
    ) as bar:
        for name, tensor, consumed in model_tensors(model, files, add_prefix):
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


# ---------------------------------------------------------------------------------------------
# Destination directory handling: temporary directory beside DST, atomic rename at the end.
# ---------------------------------------------------------------------------------------------


def temp_dir_for(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.converting-{os.getpid()}"


def remove_stale_temp_dirs(dst: Path) -> None:
    """Remove temporary directories left by converter runs that were killed."""
    for path in dst.parent.glob(f".{dst.name}.converting-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours, or a live process of another user


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, generation_config.json, chat template, license, model card..."""
    copied = []
    for path in sorted(src.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.name in SKIP_FILES
            or path.name.endswith(SKIP_SUFFIXES)
        ):
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def output_config(
    config: dict[str, Any], dtype_name: str | None, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json for the output: hub dialect (what mlx-lm reads), sorted keys as mlx-lm does."""
    out = normalize_config(config)
    out.pop("dtype", None)
    out.pop("_name_or_path", None)
    if dtype_name is not None:
        out["torch_dtype"] = dtype_name
    if quantization is not None:
        out["quantization"] = quantization
        out["quantization_config"] = quantization
    return dict(sorted(out.items()))


def check_destination(dst: Path, src: Path | None, force: bool) -> None:
    if src is not None:
        s, d = src.resolve(), dst.resolve()
        if d == s or s.is_relative_to(d):
            raise ConvertError(f"--mlx-path {dst}: would overwrite the source checkpoint {src}")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConvertError(f"--mlx-path {dst}: already exists (pass --force to replace it)")
        if not dst.is_dir():
            raise ConvertError(f"--mlx-path {dst}: exists and is not a directory")
    if reason := weights.unwritable_reason(dst.parent):  # e.g. a read-only mount
        raise ConvertError(f"{dst}: cannot write ({reason})")


def replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing `dst` (--force) is swapped out first."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        dst.rename(old)
        try:
            tmp.rename(dst)
        except BaseException:
            old.rename(dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


# ---------------------------------------------------------------------------------------------


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
) -> Path:
    """Convert `hf_path` (directory or hub id) into an MLX checkpoint at `mlx_path`.

    Same arguments as `mlx_lm.convert` (plus `quant_recipe`, which implies `quantize`, and
    `force`). Returns the destination directory.
    """
    dst = Path(mlx_path).expanduser()
    if quant_recipe is not None:
        quantize = True
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
    source_quant = config.get("quantization") or config.get("quantization_config")
    if source_quant:
        method = source_quant.get("quant_method", "mlx") if isinstance(source_quant, dict) else "?"
        raise ConvertError(
            f"{src / 'config.json'}: the source is already quantized ({method}); "
            "convert from the bf16 release"
        )
    args = ModelArgs.from_dict(config, str(src / "config.json"))
    model = Model(args)  # parameters stay lazy: only names and shapes are used

    files, tensors = read_source_headers(src)
    check_against_config(model, tensors, src)
    add_prefix = body_only(tensors)
    total_bytes = sum(nbytes for _, _, nbytes in tensors.values())

    dtype_name = dtype or config.get("torch_dtype") or config.get("dtype")
    if dtype_name not in DTYPES:
        dtype_name = None  # keep each tensor's own dtype, as mlx-lm does
    settings, quantization = {}, None
    if quantize:
        settings, quantization = quant.plan_quantization(model, bits, group_size, recipe)

    what = f"quantized: {quant.describe(settings)}" if quantize else "not quantized"
    print(
        f"[INFO] {src} -> {dst}: {len(files)} source shard(s), {total_bytes / 2**30:.2f} GiB, "
        f"dtype {dtype_name or 'as stored'}, {what}",
        flush=True,
    )
    # Every write happens below; a failure removes what was written, down to the parent
    # directories made for `dst`, and an OSError (disk full, read-only...) becomes one line.
    tmp, new_dirs = temp_dir_for(dst), [p for p in dst.parents if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
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
        )
        writer.finish()
        copy_side_files(src, tmp)
        out_config = output_config(config, dtype_name, quantization)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=4) + "\n")
        replace_directory(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in new_dirs:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        if isinstance(e, OSError):
            raise weights.file_error(e, dst, src) from None
        raise
    bpw = 8 * writer.total_bytes / max(parameters, 1)
    print(
        f"[INFO] Wrote {dst}: {len(writer.shards)} shard(s), "
        f"{writer.total_bytes / 2**30:.2f} GiB, {bpw:.3f} bits per weight",
        flush=True,
    )
    return dst


def configure_parser(prog: str = "python -m qwen3_mlx.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Hugging Face Qwen3 / Qwen3-MoE checkpoint to MLX format.",
    )
    parser.add_argument("--hf-path", "--model", required=True, help="Local directory or hub id.")
    parser.add_argument(
        "--mlx-path", default="mlx_model", help="Output directory (default: mlx_model)."
    )
    parser.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Quantize the weights (default: keep them unquantized).",
    )
    parser.add_argument(
        "--q-group-size", type=int, default=None, help="32, 64 or 128 (default: 64)."
    )
    parser.add_argument(
        "--q-bits", type=int, default=None, help="2, 3, 4, 5, 6 or 8 (default: 4, or the recipe's)."
    )
    parser.add_argument(
        "--q-mode", default="affine", help="Quantization mode (only 'affine', the default)."
    )
    parser.add_argument(
        "--quant-recipe",
        "--quant-predicate",
        dest="quant_recipe",
        default=None,
        help=f"Mixed-precision recipe, implies -q: {', '.join(quant.recipe_names())} "
        "(default: none, uniform bits).",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float16, bfloat16 or float32 for unquantized tensors and scales "
        "(default: config.json's torch_dtype).",
    )
    parser.add_argument("--force", action="store_true", help="Replace an existing --mlx-path.")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"Output shard size (default: {DEFAULT_MAX_SHARD_SIZE}).",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="Hide the progress bar (default: shown)."
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.convert") -> int:
    args = configure_parser(prog).parse_args(argv)
    options = vars(args)
    options["progress"] = not options.pop("no_progress")
    try:
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

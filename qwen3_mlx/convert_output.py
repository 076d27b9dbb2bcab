"""The converter's destination: checks, a hidden temp dir beside it, side files, atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import weights
from .config import normalize_config
from .errors import ConvertError
from .weights import INDEX_FILE

# Files from the source directory that are weights (rewritten) or not worth carrying over.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
SKIP_FILES = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json"}


def check_destination(dst: Path, src: Path | None, force: bool) -> None:
    """Refuse a destination that is the source, exists (without --force) or cannot be written."""
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


def temp_dir_for(dst: Path) -> Path:
    # Hidden and named after our pid, so a killed run's leftovers are recognizable as such.
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


def write_side_files(
    src: Path,
    out_dir: Path,
    config: dict[str, Any],
    dtype_name: str | None,
    quantization: dict[str, Any] | None,
) -> None:
    """Everything beside the weights: the source's side files, then the output's config.json."""
    copy_side_files(src, out_dir)
    out_config = output_config(config, dtype_name, quantization)
    (out_dir / "config.json").write_text(json.dumps(out_config, indent=4) + "\n")


def replace_directory(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing `dst` (--force) is swapped out first."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        dst.rename(old)
        try:
            tmp.rename(dst)
        except BaseException:
            old.rename(dst)  # put the previous model back rather than leave no model at all
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


@contextlib.contextmanager
def staged_output(dst: Path, src: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `dst`; rename it to `dst` if the block succeeds.

    Every write of a conversion happens inside this block. A failure (or Ctrl-C) removes what
    was written, down to the parent directories made for `dst`, so nothing that looks like a
    model is left behind; an OSError (disk full, read-only...) becomes one line naming the path.
    """
    tmp, new_dirs = temp_dir_for(dst), [p for p in dst.parents if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        replace_directory(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in new_dirs:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        if isinstance(e, OSError):
            raise weights.file_error(e, dst, src) from None
        raise

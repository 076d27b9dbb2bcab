"""The converter's command line: its argparse parser and the parsing of `--max-shard-size`."""

from __future__ import annotations

import argparse
import re

from . import quant
from .errors import ConvertError

DEFAULT_MAX_SHARD_SIZE = "5GB"  # mlx-lm's shard size


def parse_size(text: str) -> int:
    """Bytes in a size like "5GB", "500MB" or "1.5G" (binary units, as mlx-lm reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)I?B?\s*", str(text).upper())
    if not match:
        raise ConvertError(f"--max-shard-size {text!r} is not a size like '5GB' or '500MB'")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def configure_parser(prog: str = "python -m qwen3_mlx.convert") -> argparse.ArgumentParser:
    """The parser of `python -m qwen3_mlx.convert`; its flags follow `mlx_lm.convert`'s."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a Hugging Face (or GGUF / Ollama) Qwen3 / Qwen3-MoE checkpoint to MLX.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="Local directory or hub id.")
    source.add_argument("--gguf", help="A llama.cpp Qwen3 / Qwen3-MoE .gguf file.")
    source.add_argument(
        "--ollama", metavar="NAME[:TAG]", help="A model in Ollama's store, e.g. qwen3:8b."
    )
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
        "--q-group-size",
        type=int,
        default=None,
        help="affine: 32, 64 or 128 (default: 64); the other modes take only their own.",
    )
    parser.add_argument(
        "--q-bits",
        type=int,
        default=None,
        help="affine: 2, 3, 4, 5, 6 or 8 (default: 4, or the recipe's); the other modes take "
        "only their own.",
    )
    # Checked by quant.validate_settings, not argparse `choices`: a bad value is one line, exit 1.
    parser.add_argument(
        "--q-mode",
        default="affine",
        help=f"Quantization mode: {', '.join(quant.MODES)} (default: affine). mxfp4 is 4-bit "
        "groups of 32, nvfp4 4-bit groups of 16, mxfp8 8-bit groups of 32; the router stays "
        "8-bit affine.",
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
    parser.add_argument(
        "-d",
        "--dequantize",
        action="store_true",
        help="Dequantize a quantized MLX checkpoint (any mode) to float.",
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

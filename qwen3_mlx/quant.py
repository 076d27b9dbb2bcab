"""Quantization recipes: which module gets which bits and group size.

Four modes, mlx-lm's (`--q-mode`): "affine" (per-group scale and bias, 2-8 bits, groups of
32/64/128) and the microscaling float formats "mxfp4" (4-bit, groups of 32), "nvfp4" (4-bit,
groups of 16) and "mxfp8" (8-bit, groups of 32), which store a uint8 scale per group and no
bias, and take exactly one (bits, group size) each.

* The default recipe is mlx-lm's, so our conversions are bit-identical to `mlx_lm.convert -q`:
  every Linear, Embedding and stacked-expert projection at `--q-bits`/`--q-group-size`; the
  MoE router `mlp.gate` at 8 bits, group 64 (routing flips on small errors and the router is
  tiny); modules whose input dimension the group size does not divide stay unquantized.
* The mixed recipes follow llama.cpp's Q4_K_M idea (and mlx-lm's `mixed_*` predicates): the
  output head, the embeddings, and `v_proj`/`down_proj` of the first and last eighth of the
  layers plus every third layer in between get the high bit width; everything else the low
  one. Unlike mlx-lm's mixed recipes, the router stays at 8 bits and the embeddings get the
  high width (for tied checkpoints they *are* the output head).

  In every mode the router is 8-bit affine: its entry carries no "mode", which mlx-lm (and
  our loader) read as affine, whatever the top-level mode.

The choices are recorded in config.json the way mlx-lm writes them:
    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}, ...}
plus an identical "quantization_config" copy. Only modules whose settings the recipe names
explicitly get an entry; the others use the top-level default, or stay unquantized when
their weights have no `.scales`. `named_settings` and `inferred_settings` read a checkpoint's choices back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ConvertError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
# mlx-lm's defaults_for_mode: (group size, bits). The float modes take only these.
MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
# mlx-lm's qwen3_moe.quant_predicate returns exactly this dict (no "mode" key): keep it equal
# so our config.json matches mlx-lm's.
ROUTER_SETTINGS = {"group_size": 64, "bits": 8}


@dataclass(frozen=True)
class Recipe:
    low_bits: int
    high_bits: int
    description: str


RECIPES = {
    "mixed_2_6": Recipe(2, 6, "2-bit, sensitive tensors 6-bit (smallest; noticeable loss)"),
    "mixed_3_4": Recipe(3, 4, "3-bit, sensitive tensors 4-bit"),
    "mixed_3_6": Recipe(3, 6, "3-bit, sensitive tensors 6-bit"),
    "mixed_4_6": Recipe(4, 6, "4-bit, sensitive tensors 6-bit (llama.cpp Q4_K_M-like)"),
}
RECIPE_ALIASES = {"q4_k_m": "mixed_4_6"}

Predicate = Callable[[str, nn.Module], bool | dict[str, Any]]


def recipe_names() -> list[str]:
    return [*RECIPES, *RECIPE_ALIASES]


def resolve_recipe(name: str | None) -> str | None:
    if name is None:
        return None
    canonical = RECIPE_ALIASES.get(name, name)
    if canonical not in RECIPES:
        raise ConvertError(
            f"--quant-recipe {name!r} is not a known recipe (choose from {', '.join(recipe_names())})"
        )
    return canonical


def validate_settings(
    bits: int | None, group_size: int | None, mode: str = "affine", recipe: str | None = None
) -> tuple[int, int, str | None]:
    """Check the user's flags; return (bits, group_size, canonical recipe name)."""
    if mode not in MODES:
        raise ConvertError(f"--q-mode {mode!r} is not supported (choose from {', '.join(MODES)})")
    if mode != "affine":
        return (*_float_mode_settings(mode, bits, group_size, recipe), None)
    recipe = resolve_recipe(recipe)
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ConvertError(
            f"--q-group-size {group_size} is not supported "
            f"(choose from {', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
        )
    if recipe is not None:
        low = RECIPES[recipe].low_bits
        if bits is not None and bits != low:
            raise ConvertError(
                f"--q-bits {bits} conflicts with --quant-recipe {recipe} "
                f"(which uses {low} and {RECIPES[recipe].high_bits} bits); drop --q-bits"
            )
        bits = low
    if bits is None:
        bits = DEFAULT_BITS
    if bits not in SUPPORTED_BITS:
        raise ConvertError(
            f"--q-bits {bits} is not supported (choose from {', '.join(map(str, SUPPORTED_BITS))})"
        )
    return bits, group_size, recipe


def _float_mode_settings(
    mode: str, bits: int | None, group_size: int | None, recipe: str | None
) -> tuple[int, int]:
    """(bits, group_size) of a float mode; MLX packs each in one format only."""
    default_group, default_bits = MODES[mode]
    if recipe is not None:  # as mlx-lm: "Quant predicates only support 'affine' quantization."
        raise ConvertError(f"--quant-recipe {recipe} needs --q-mode affine, not {mode}")
    if bits is not None and bits != default_bits:
        raise ConvertError(
            f"--q-bits {bits} is not supported with --q-mode {mode} (it is {default_bits}-bit)"
        )
    if group_size is not None and group_size != default_group:
        raise ConvertError(
            f"--q-group-size {group_size} is not supported with --q-mode {mode} "
            f"(its groups are of {default_group})"
        )
    return default_bits, default_group


def named_settings(quantization: dict[str, Any], path: str) -> dict[str, Any] | None:
    """Module `path`'s own entry in a checkpoint's "quantization" dict, as mlx-lm reads it, or
    None. mlx-lm hands the entry to `to_quantized` as it is, so one without "mode" is affine
    (the router's, in every mode)."""
    entry = quantization.get(path)
    return {"mode": "affine", **entry} if isinstance(entry, dict) else None


def inferred_settings(
    path: str, in_dims: int, packed_cols: int, scale_cols: int, has_biases: bool
) -> dict[str, Any]:
    """A stored module's settings from its shapes, for modules without an entry (mlx-lm's
    infer_quant_config): the top-level default may not be theirs. Only affine stores biases;
    each float mode has one (bits, group size). Raises ValueError when none fits."""
    group_size, bits = in_dims // max(scale_cols, 1), packed_cols * 32 // in_dims
    if has_biases:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    for mode, (mode_group, mode_bits) in MODES.items():
        if mode != "affine" and (mode_group, mode_bits) == (group_size, bits):
            return {"group_size": group_size, "bits": bits, "mode": mode}
    raise ValueError(
        f"{path}: {bits}-bit groups of {group_size} without biases match no quantization mode"
    )


def layer_index(path: str) -> int | None:
    parts = path.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def uses_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: first and last eighth of the layers, then every third."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def default_predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
    if path.endswith("mlp.gate"):
        return dict(ROUTER_SETTINGS)
    return True


def mixed_predicate(recipe: str, group_size: int, num_layers: int) -> Predicate:
    low, high = RECIPES[recipe].low_bits, RECIPES[recipe].high_bits

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path.endswith("mlp.gate"):
            return dict(ROUTER_SETTINGS)
        bits = low
        if path == "lm_head" or path.endswith("embed_tokens"):
            bits = high
        elif path.endswith(("v_proj", "down_proj")):
            layer = layer_index(path)
            if layer is not None and uses_more_bits(layer, num_layers):
                bits = high
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    return predicate


def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that can be swapped for a quantized version (Linear, Embedding, expert stacks)."""
    # Same traversal as nn.quantize, so config entries come out in mlx-lm's order.
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [(path, m) for path, m in leaves if hasattr(m, "to_quantized") and "weight" in m]


def plan_quantization(
    model: nn.Module, bits: int, group_size: int, recipe: str | None = None, mode: str = "affine"
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Decide every module's settings, as mlx-lm's quantize_model would.

    Returns ({module path: {"group_size", "bits", "mode"}} for the modules to quantize,
    the "quantization" dict for config.json). Needs only shapes, so `model` may be lazy
    (its random init never evaluated).
    """
    default = {"group_size": group_size, "bits": bits, "mode": mode}
    if recipe is None:
        predicate = default_predicate
    else:
        predicate = mixed_predicate(recipe, group_size, len(model.layers))
    settings: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = dict(default)
    for path, module in quantizable_modules(model):
        in_dims = module.weight.shape[-1]
        if in_dims % group_size:  # mlx-lm leaves these unquantized too
            continue
        choice = predicate(path, module)
        if choice is False:
            continue
        if isinstance(choice, dict):
            if in_dims % choice["group_size"]:
                continue
            config[path] = choice
            settings[path] = {"mode": "affine", **choice}
        else:
            settings[path] = dict(default)
    return settings, config


def quantize_weight(weight: mx.array, setting: dict[str, Any]) -> dict[str, mx.array]:
    """weight → {"weight": packed uint32, "scales"(, "biases": affine only)} exactly as
    nn.quantize stores it."""
    packed, scales, *biases = mx.quantize(
        weight, setting["group_size"], setting["bits"], mode=setting.get("mode", "affine")
    )
    return {"weight": packed, "scales": scales, **({"biases": biases[0]} if biases else {})}


def describe(settings: dict[str, dict[str, Any]]) -> str:
    """A short human summary such as '4-bit g64 (193 modules), 8-bit g64 (3 modules)'; float
    modes are named: 'mxfp4 4-bit g32 (193 modules), 8-bit g64 (3 modules)'."""
    counts: dict[tuple[str, int, int], int] = {}
    for s in settings.values():
        key = (s.get("mode", "affine"), s["bits"], s["group_size"])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(
        f"{'' if mode == 'affine' else mode + ' '}{bits}-bit g{gs} ({n} modules)"
        for (mode, bits, gs), n in sorted(counts.items())
    )

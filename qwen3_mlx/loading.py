"""Build a model from a directory: config.json + safetensors (HF, ours, mlx-lm's)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import quant
from .config import ModelArgs, load_config
from .errors import ConfigError
from .hub import resolve_model_path
from .kernels import OFF, KernelOptions
from .model import Model
from .weights import check_and_load, iter_shards


def quantization_of(config: dict[str, Any]) -> dict[str, Any] | None:
    return config.get("quantization") or config.get("quantization_config")


def apply_quantization(model: Model, quantization: dict[str, Any], weights: dict, source: str):
    """Swap modules for quantized ones as the checkpoint says (mlx-lm's convention).

    `quantization` holds the default `group_size`/`bits`/`mode` plus per-module overrides keyed by
    module path (a dict of settings, or False for "left unquantized"), in any of MLX's modes.
    `weights` needs only `in` and `[name].shape` (the distributed loader passes its headers).
    """
    try:
        default = {"group_size": int(quantization["group_size"]), "bits": int(quantization["bits"])}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"{source}: 'quantization' needs integer 'group_size' and 'bits'"
        ) from None
    mode = quantization.get("mode", "affine")
    if mode not in quant.MODES:
        raise ConfigError(
            f"{source}: quantization mode {mode!r} is not supported "
            f"(choose from {', '.join(quant.MODES)})"
        )

    def predicate(path: str, module: nn.Module):
        if f"{path}.global_scale" in weights:  # nvfp4 with a per-tensor scale: not modelled here
            raise ConfigError(
                f"{source}: {path} has a global_scale (nvfp4), which is not supported"
            )
        named = quant.named_settings(quantization, path)
        if named is not None:
            return named
        if quantization.get(path) is False or not hasattr(module, "to_quantized"):
            return False
        if f"{path}.scales" not in weights:
            return False
        try:
            return quant.inferred_settings(
                path,
                module.weight.shape[-1],
                weights[f"{path}.weight"].shape[-1],
                weights[f"{path}.scales"].shape[-1],
                f"{path}.biases" in weights,
            )
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    nn.quantize(model, **default, mode=mode, class_predicate=predicate)


def build_model(config: dict[str, Any], source: str = "config.json", kernels=None) -> Model:
    return Model(ModelArgs.from_dict(config, source), kernels=kernels)


def load_model(
    path_or_id: str | Path,
    *,
    lazy: bool = False,
    long_context: bool = False,
    kernels=None,
    compile: str | bool | None = None,
) -> tuple[Model, dict[str, Any]]:
    """`long_context=True` switches on YaRN to 131,072 tokens (see cache.enable_long_context);
    `kernels` and `compile` as in `load`."""
    model_dir = resolve_model_path(path_or_id)
    config = load_config(model_dir)
    if long_context:
        from .cache import enable_long_context

        config = enable_long_context(config)
    model = model_from_config(model_dir, config, lazy=lazy, kernels=kernels, compile=compile)
    return model, config


def model_from_config(
    model_dir: Path,
    config: dict[str, Any],
    *,
    lazy: bool = False,
    body_only: bool = False,
    kernels=None,
    compile: str | bool | None = None,
) -> Model:
    """The model `config` describes, with the weights of `model_dir` (quantized as they are).
    `body_only`: no lm_head is loaded (an embedding model's bare body); `kernels` and `compile`
    as in `load`."""
    source = str(model_dir / "config.json")
    if body_only:
        # The bare body has no lm_head; tying the head means none is expected (it is never used).
        config = {**config, "tie_word_embeddings": True}
    model = build_model(config, source, kernels=OFF)  # decided below, once the modules stand
    weights: dict[str, mx.array] = {}
    for _, shard in iter_shards(model_dir):
        weights.update(shard)
    weights = model.sanitize(weights)
    if body_only:
        weights.pop("lm_head.weight", None)
    quantization = quantization_of(config)
    if quantization and any(k.endswith(".scales") for k in weights):
        apply_quantization(model, quantization, weights, source)
    check_and_load(model, weights, str(model_dir))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    plan = model.use_kernels(kernels, compile)
    if plan.any and not lazy and KernelOptions.of(kernels).kernels == "auto":
        from .kernels.check import keep_faster

        model.use_kernels(keep_faster(model, plan))
    return model


def load(
    path_or_id: str | Path | None = None,
    *,
    lazy: bool = False,
    long_context: bool = False,
    kernels=None,
    compile: str | bool | None = None,
):
    """Load a Qwen3 checkpoint directory or hub id → (model, tokenizer), ready to generate
    (see `prepare_for_inference`). Without one, the embedded demo model (as the command-line
    tools without `--model`), with a one-line notice on stderr.

    `kernels`: which fused GPU kernels run (None: the QWEN3_MLX_KERNELS switches; "auto" each
    kernel that passed its check on this GPU, "0" none, "1" all; or a KernelOptions). `compile`:
    the compiled decode step (None: QWEN3_MLX_COMPILE; True/False, or "layer")."""
    from .tokenizer import load_tokenizer

    if path_or_id is None or path_or_id == "":
        path_or_id = _demo_model_path()
    model_dir = resolve_model_path(path_or_id)
    model, _ = load_model(
        model_dir, lazy=lazy, long_context=long_context, kernels=kernels, compile=compile
    )
    return prepare_for_inference(model), load_tokenizer(model_dir)


def _demo_model_path() -> str:
    from .assets import DEMO_MODEL_PATH, resolve_model_argument

    path = resolve_model_argument(None, notice=False)  # ConfigError when it is missing
    print(f"No model given: using the built-in demo model ({DEMO_MODEL_PATH})", file=sys.stderr)
    return path


# A quantized output head is replaced by its dense copy on the CPU backend up to this size.
DENSE_HEAD_MAX_BYTES = 512 << 20


def prepare_for_inference(model: Model) -> Model:
    """Adapt a loaded model to the device it decodes on (in place; returns it).

    On MLX's CPU backend a quantized matmul with half-precision scales costs 7-10x the dense one
    (4-bit 151,936 x 32 head: 46 ms at batch 1 and 393 ms at batch 8 with bf16 scales, vs 7 ms and
    28 ms dense; fp16 scales: 209 vs 25 ms; with float32 scales it is as fast as dense), and the
    output head is the widest matmul of a decode step. So there a quantized half-precision head
    (`lm_head`, or the tied embedding) of modest size is swapped for its dequantized copy in the
    same dtype: logits agree with the quantized path to rounding, and the tied embedding's lookups
    stay bit-identical. Elsewhere (Metal, CUDA) nothing changes. Only for generation: the swapped
    model no longer saves as the quantized checkpoint it came from.
    """
    if mx.default_device() != mx.cpu:
        return model
    stage = getattr(model.model, "stage", None)
    if stage is not None and not stage.has_head:  # a pipeline stage whose logits are elsewhere
        return model
    tied = model.args.tie_word_embeddings
    owner, name = (model.model, "embed_tokens") if tied else (model, "lm_head")
    head = owner.get(name)
    if head is None or not hasattr(head, "scales") or head.scales.dtype == mx.float32:
        return model
    rows, cols = head.weight.shape[0], head.weight.shape[1] * 32 // head.bits
    # Lazy: only its size is read unless it is kept. An affine table dequantizes to its scales'
    # dtype; the float modes (uint8 scales, slower still on the CPU) to MLX's default, which is
    # what their embedding lookups return, so the tied rows stay bit-identical there too.
    weight = mx.dequantize(
        head.weight,
        head.scales,
        head.get("biases"),
        group_size=head.group_size,
        bits=head.bits,
        mode=getattr(head, "mode", "affine"),
    )
    if weight.nbytes > DENSE_HEAD_MAX_BYTES:
        return model
    if tied:
        dense = nn.Embedding(rows, cols)
    else:
        dense = nn.Linear(cols, rows, bias="bias" in head)
        if "bias" in head:
            dense.bias = head.bias
    dense.weight = weight
    mx.eval(dense.parameters())
    # Through update_modules: the compiled decode step is rebuilt with the new module.
    model.update_modules({"model": {name: dense}} if tied else {name: dense})
    return model

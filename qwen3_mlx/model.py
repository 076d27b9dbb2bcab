"""Qwen3 and Qwen3-MoE in MLX: one model class for both, driven by config.json.

The layers are in layers.py (attention, MLP, decoder layer) and moe.py (the sparse MoE block);
the compiled one-token decode steps in decode_steps.py. Parameter names are mlx-lm's, so
`sanitize()` is the only place that knows about Hugging Face names.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from . import kernels as fused
from .cache import drop_transposed_keys
from .config import ModelArgs
from .decode_steps import (
    CompiledDecode,
    CpuDecode,
    compile_mode,
    embed_rows,
    offset_array,
)
from .kernels.options import OFF, KernelOptions, KernelPlan, plan_for, use_plan
from .layers import MLP, Attention, DecoderLayer, fuse

# Names other modules (and tests) take from here.
__all__ = [
    "MLP",
    "Attention",
    "CompiledDecode",
    "CpuDecode",
    "DecoderLayer",
    "Model",
    "ModelArgs",
    "Qwen3Model",
    "compile_mode",
    "create_attention_mask",
    "embed_rows",
]


class Qwen3Model(nn.Module):
    """The transformer body: embeddings → layers → final norm (hidden states out)."""

    kernel_plan: KernelPlan = OFF  # set by Model.use_kernels

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.compile_mode = compile_mode()  # parsed once; Model.use_kernels may change it
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list | None = None, input_embeddings=None):
        if input_embeddings is None and inputs.shape[1] == 1 and cache:
            step = self._cpu_step(cache)
            offset = mx.array(cache[0].offset, dtype=mx.int32) if step is not None else None
            if step is not None and self._traced(step, "_cpu_step_failed", inputs, offset):
                return step(inputs, cache, offset)
        if cache and "_compiled_cpu" in self.__dict__:
            drop_transposed_keys(cache)  # the CPU step's copies go stale when written below
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        if h.shape[1] == 1 and cache and all(c is not None for c in cache):
            step = self._decode_step()
            offset = offset_array(cache[0]) if step is not None else None
            if step is not None and self._traced(step, "_compile_failed", self, h, offset):
                return step(self, h, cache, offset)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return self.norm(h)

    def _traced(self, step, failed_flag: str, *inputs) -> bool:
        """Trace a compiled step for these inputs before any cache is touched; if the backend
        cannot compile one of its ops, warn, remember it (`failed_flag`) and fall back."""
        try:
            step.trace(*inputs)
        except Exception as exc:
            warnings.warn(f"{type(step).__name__} unavailable: {exc}", stacklevel=3)
            object.__setattr__(self, failed_flag, True)
            return False
        return True

    def _compile_wanted(self) -> bool:
        return self.compile_mode != "0"

    def _cpu_step(self, cache: list) -> CpuDecode | None:
        """CpuDecode where it applies: CPU device, compiled decode on and not forced to the
        per-layer step, plain KV caches, stock layers."""
        if mx.default_device().type != mx.DeviceType.cpu or self.__dict__.get("_cpu_step_failed"):
            return None
        if not self._compile_wanted() or self.compile_mode == "layer":
            return None
        if not all(type(c) is KVCache for c in cache):
            return None
        step = self._get_compiled("_compiled_cpu", CpuDecode)
        return step if step.supported else None

    def _decode_step(self) -> CompiledDecode | None:
        if not self._compile_wanted() or self.__dict__.get("_compile_failed"):
            return None
        return self._get_compiled("_compiled", CompiledDecode)

    def _get_compiled(self, attr: str, kind):
        """The cached compiled-step object `kind`, rebuilt when weights or switches change."""
        # The traced steps bake in which kernels run: rebuild them when a switch changes.
        key = (self.kernel_plan, self.compile_mode, mx.default_device())
        cached = self.__dict__.get(attr)
        if cached is not None and cached[0] == key:
            return cached[1]
        mx.eval(self.parameters())  # constants of the trace must be concrete arrays
        if self.kernel_plan.any:
            fused.prepare(self)
        for layer in self.layers:  # fuse projections before tracing, not inside it
            attn = layer.self_attn
            fuse(attn, "_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
            attn.inv_freq()
            if attn.rope._periods is not None:
                mx.eval(attn.rope._periods)
            if isinstance(layer.mlp, MLP):
                fuse(layer.mlp, "_gate_up", [layer.mlp.gate_proj, layer.mlp.up_proj])
        step = kind(self)
        object.__setattr__(self, attr, (key, step))
        return step

    def reset_compiled(self) -> None:
        """Forget compiled decode steps (their weights are constants of the trace)."""
        self.__dict__.pop("_compiled", None)
        self.__dict__.pop("_compiled_cpu", None)

    def update(self, parameters: dict, strict: bool = True) -> Qwen3Model:
        self.reset_compiled()
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True) -> Qwen3Model:
        self.reset_compiled()
        return super().update_modules(modules, strict=strict)


class Model(nn.Module):
    """Causal LM: `model(tokens (B, L), cache)` → logits (B, L, vocab)."""

    kernel_plan: KernelPlan = OFF

    def __init__(self, args: ModelArgs, kernels=None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.use_kernels(kernels)

    def use_kernels(self, kernels=None, compile: str | bool | None = None) -> KernelPlan:
        """Decide once which fused kernels run (`kernels`: a KernelPlan as is; else
        KernelOptions.of(kernels), None being the QWEN3_MLX_* switches) and hand the plan to
        every layer; `compile` (None: unchanged) sets the compile switch. Returns the plan."""
        plan = kernels if isinstance(kernels, KernelPlan) else plan_for(KernelOptions.of(kernels))
        use_plan(self, plan)
        if compile is not None:
            self.model.compile_mode = compile_mode(compile)
        self.model.reset_compiled()
        return plan

    def __call__(self, inputs: mx.array, cache: list | None = None, input_embeddings=None):
        return self.logits(self.model(inputs, cache, input_embeddings))

    def logits(self, hidden: mx.array) -> mx.array:
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        if self.kernel_plan.linear and fused.logits_covered(head, hidden):
            return fused.logits(head, hidden)  # a few tokens: one pass over the weights
        if self.args.tie_word_embeddings:
            return head.as_linear(hidden)
        return head(hidden)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def update(self, parameters: dict, strict: bool = True) -> Model:
        self.model.reset_compiled()
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True) -> Model:
        self.model.reset_compiled()
        return super().update_modules(modules, strict=strict)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensor names onto this model's (HF per-expert → stacked experts)."""
        # Qwen3-Embedding checkpoints are saved from the bare body: no "model." prefix, no lm_head.
        if any(k.startswith("layers.") for k in weights):
            weights = {
                (k if k.startswith(("model.", "lm_head.")) else f"model.{k}"): v
                for k, v in weights.items()
            }
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        for layer_idx in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{layer_idx}.mlp"
            if f"{prefix}.experts.0.gate_proj.weight" not in weights:
                continue
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stacked = [
                    weights.pop(f"{prefix}.experts.{e}.{proj}.weight")
                    for e in range(self.args.num_experts)
                ]
                weights[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack(stacked)
        return weights

    @property
    def quant_predicate(self):
        """The MoE router stays at 8 bits: routing decisions are sensitive to its error."""

        def predicate(path: str, module: nn.Module):
            if path.endswith("mlp.gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate

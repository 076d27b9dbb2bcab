"""Fused GPU kernels for the decode step (Metal on Apple GPUs, CUDA through MLX's CUDA backend).

  build      the sources (`kernel_sources/`) and their launch through MLX
  tuning     coverage limits and launch shapes, chosen by measurement
  moe        router, gate+up+SwiGLU, down + weighted sum
  dense      quantized linear (o_proj, lm_head), a dense MLP, residual add + RMSNorm
  attention  q/k norm + RoPE, the attention prologue, split-K decode attention
  options    the switches (KernelOptions) and what a model runs (KernelPlan)
  check      each kernel checked against the reference ops on this device, verdicts cached

The CPU backend, and any shape or quantization a kernel does not cover, take the reference ops
(`gather_qmm`, `mx.fast.rms_norm`/`rope`) in moe.py and model.py.
"""

from .attention import (
    attention_splits,
    attn_prologue,
    decode_attention,
    decode_attention_covered,
    prologue_covered,
    qk_norm_rope,
    qk_norm_rope_covered,
)
from .build import SPECS, affine_params, backend, kernel_source, launched_by, tickets
from .dense import (
    add_rms_norm,
    add_rms_norm_covered,
    dense_mlp,
    linear,
    linear_residual,
    linear_residual_covered,
    logits,
    logits_covered,
    mlp_covered,
    prepare,
)
from .moe import down, experts_covered, gate_up, moe_experts, moe_router, router_covered
from .options import OFF, KernelOptions, KernelPlan, plan_for, use_plan

__all__ = [
    "OFF", "SPECS", "KernelOptions", "KernelPlan", "add_rms_norm", "add_rms_norm_covered",
    "affine_params", "attention_splits", "attn_prologue", "backend", "decode_attention",
    "decode_attention_covered", "dense_mlp", "down", "experts_covered", "gate_up",
    "kernel_source", "launched_by", "linear", "linear_residual", "linear_residual_covered",
    "logits", "logits_covered", "mlp_covered", "moe_experts", "moe_router", "plan_for",
    "prepare", "prologue_covered", "qk_norm_rope", "qk_norm_rope_covered", "router_covered",
    "tickets", "use_plan",
]  # fmt: skip

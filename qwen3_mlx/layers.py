"""Qwen3's decoder layer: pre-norm attention (GQA, RMSNorm on each q/k head, RoPE), then a pre-norm
feed-forward that is a SwiGLU MLP or a sparse MoE block (moe.py).

In decode steps q/k/v (and a dense MLP's gate/up) run as one matmul over weights concatenated
after loading (`FusedLinear`), never renamed on disk. Where fused kernels run (qwen3_mlx.kernels),
a decode layer is: attention prologue (norm → qkv → q/k norm → RoPE), cache update, attention,
output projection + residual, then router / gate+up / down (norms folded in).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from . import kernels as fused
from .config import ModelArgs
from .kernels.options import OFF, KernelPlan
from .moe import SparseMoeBlock
from .rope import RoPE


class FusedLinear:
    """Several bias-free linear layers over the same input as one matmul.

    Built from loaded layers: their weights are concatenated once and each layer's
    parameters are re-pointed at views of the concatenation, so no memory is duplicated and
    parameter names (and saved checkpoints) stay as they were. `current()` notices when the
    layers got new weights (load_weights, quantize) and the fusion must be rebuilt.
    """

    def __init__(self, layers: list[nn.Module], keys: tuple[str, ...], quant: dict | None):
        self.layers, self.keys, self.quant = layers, keys, quant
        self.sizes = [layer["weight"].shape[0] for layer in layers]
        fused_params = {k: mx.concatenate([layer[k] for layer in layers]) for k in keys}
        mx.eval(fused_params)
        self.params = fused_params
        start = 0
        for layer, size in zip(layers, self.sizes, strict=True):
            for k in keys:
                layer[k] = fused_params[k][start : start + size]
            start += size
        mx.eval([layer[k] for layer in layers for k in keys])
        self.sources = [layer["weight"] for layer in layers]

    @classmethod
    def build(cls, layers: list[nn.Module]) -> FusedLinear | None:
        first = layers[0]
        if any("bias" in layer for layer in layers):
            return None
        if all(type(layer) is nn.QuantizedLinear for layer in layers):
            quant = {"group_size": first.group_size, "bits": first.bits, "mode": first.mode}
            if any(
                (layer.group_size, layer.bits, layer.mode) != tuple(quant.values())
                for layer in layers
            ):
                return None
            keys = tuple(k for k in ("weight", "scales", "biases") if k in first)
            if any(
                tuple(k for k in ("weight", "scales", "biases") if k in layer) != keys
                for layer in layers
            ):
                return None
            return cls(layers, keys, quant)
        if all(type(layer) is nn.Linear for layer in layers):
            return cls(layers, ("weight",), None)
        return None

    def current(self) -> bool:
        return all(
            layer["weight"] is src for layer, src in zip(self.layers, self.sources, strict=True)
        )

    def __call__(self, x: mx.array) -> mx.array:
        p = self.params
        if self.quant is None:
            return x @ p["weight"].T
        return mx.quantized_matmul(
            x, p["weight"], p["scales"], p.get("biases"), transpose=True, **self.quant
        )


def fuse(owner: nn.Module, attr: str, layers: list[nn.Module]) -> FusedLinear | None:
    """The (cached) FusedLinear of `layers`, kept on `owner` outside the parameter tree."""
    current = owner.__dict__.get(attr)
    if current is not None and current.current():
        return current
    fused_layer = FusedLinear.build(layers)
    object.__setattr__(owner, attr, fused_layer)
    return fused_layer


def merge_heads(attn: mx.array) -> mx.array:
    """(B, heads, L, head_dim) → (B, L, heads * head_dim); 3-D input passes through."""
    if attn.ndim == 3:
        return attn
    B, _, L, _ = attn.shape
    if L == 1:
        return attn.reshape(B, 1, -1)  # same memory order: no transpose needed
    return attn.transpose(0, 2, 1, 3).reshape(B, L, -1)


def residual_rms_norm(x: mx.array, delta: mx.array, norm: nn.RMSNorm, plan: KernelPlan = OFF):
    """(x + delta, norm(x + delta)), one kernel where the plan has it."""
    if plan.norm and fused.add_rms_norm_covered(x):
        return fused.add_rms_norm(x, delta, norm.weight, norm.eps)
    h = x + delta
    return h, norm(h)


class Attention(nn.Module):
    kernel_plan: KernelPlan = OFF  # set by Model.use_kernels

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        self.scale = head_dim**-0.5 * self.rope.attention_scale
        self.head_dim = head_dim

    def inv_freq(self) -> mx.array:
        """RoPE inverse frequencies with the position scale folded in (for the fused kernel)."""
        if "_inv_freq" not in self:
            inv, scale = self.rope.frequencies()
            self._inv_freq = inv * scale
            mx.eval(self._inv_freq)
        return self._inv_freq

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        """x (B, L, D) → q, k, v as (B, heads, L, head_dim), normed and rotated."""
        B, L, _ = x.shape
        qkv = fuse(self, "_qkv", [self.q_proj, self.k_proj, self.v_proj])
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.kernel_plan.rope and fused.qk_norm_rope_covered(x, self.head_dim):
            if not isinstance(offset, mx.array) or offset.dtype != mx.int32:
                offset = mx.array(offset, dtype=mx.int32)
            if qkv is not None:
                y = qkv(x)
                sources = ((y, 0), (y, nq), (y, nq + nkv))
            else:
                sources = ((self.q_proj(x), 0), (self.k_proj(x), 0), (self.v_proj(x), 0))
            return fused.qk_norm_rope(
                *sources,
                (self.n_heads, self.n_kv_heads, self.head_dim, B),
                self.q_norm.weight,
                self.k_norm.weight,
                self.inv_freq(),
                offset.reshape(-1),
                self.q_norm.eps,
            )
        if qkv is not None and L == 1:
            q, k, v = mx.split(qkv(x), [nq, nq + nkv], axis=-1)
        else:  # prefill: views into one fused output kept it alive longer (+25% peak memory)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(q, offset), self.rope(k, offset), v

    def attend(self, q, keys, values, mask: Any, cache: Any, merge: bool = True) -> mx.array:
        """Attention over the cache's keys/values; (B, heads, L, hd) → (B, L, heads * hd),
        or left as (B, heads, L, hd) with merge=False (the decode kernels read it as is)."""
        out = scaled_dot_product_attention(
            q, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return merge_heads(out) if merge else out

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        offset = cache.offset if cache is not None else 0
        q, k, v = self.project(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(self.attend(q, k, v, mask, cache))


class MLP(nn.Module):
    kernel_plan: KernelPlan = OFF  # set by Model.use_kernels

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(
        self, x: mx.array, residual: mx.array | None = None, norm: nn.RMSNorm | None = None
    ) -> mx.array:
        """(residual +) the MLP of x, or of norm(x) when `norm` is given."""
        if norm is not None:
            x = norm(x)
        if self.kernel_plan.dense_mlp and fused.mlp_covered(self, x):
            return fused.dense_mlp(self, x, residual)
        gate_up = fuse(self, "_gate_up", [self.gate_proj, self.up_proj])
        if gate_up is not None and x.shape[-2] == 1:  # decode only, as for q/k/v
            gate, up = mx.split(gate_up(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = self.down_proj(nn.silu(gate) * up)
        return y if residual is None else residual + y


class DecoderLayer(nn.Module):
    kernel_plan: KernelPlan = OFF  # set by Model.use_kernels

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.is_sparse_layer(layer_idx):
            self.mlp = SparseMoeBlock(
                args.hidden_size,
                args.moe_intermediate_size,
                args.num_experts,
                args.num_experts_per_tok,
                args.norm_topk_prob,
            )
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        q, k, v = self.start(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.finish(self.self_attn.attend(q, k, v, mask, cache), x)

    # A layer splits at its cache: start() → cache update + attention → finish(). The
    # compiled decode step runs start/finish as compiled functions around the cache.
    def start(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        """Residual stream x → q, k, v (B, heads, L, head_dim), normed and rotated."""
        attn = self.self_attn
        if self.kernel_plan.prologue:
            qkv = fuse(attn, "_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
            if fused.prologue_covered(qkv, x, attn):
                offset = offset if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
                return fused.attn_prologue(x, self.input_layernorm, qkv, attn, offset)
        return attn.project(self.input_layernorm(x), offset)

    def finish(self, attn: mx.array, x: mx.array) -> mx.array:
        """Attention output ((B, heads, L, hd) or (B, L, heads * hd)) and residual x → output."""
        o_proj = self.self_attn.o_proj
        plan = self.kernel_plan
        if plan.linear and fused.linear_residual_covered(o_proj, attn, x):
            if attn.ndim == 4 and attn.shape[2] > 1:
                attn = attn.transpose(0, 2, 1, 3)  # the kernel reads token rows
            h = fused.linear_residual(o_proj, attn, x)
            if type(self.mlp) in (SparseMoeBlock, MLP):  # they can fold the norm in
                return self.mlp(h, residual=h, norm=self.post_attention_layernorm)
            return self.mlp(self.post_attention_layernorm(h), residual=h)
        h, normed = residual_rms_norm(
            x, o_proj(merge_heads(attn)), self.post_attention_layernorm, plan
        )
        return self.mlp(normed, residual=h)

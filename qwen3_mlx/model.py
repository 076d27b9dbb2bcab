"""Qwen3 and Qwen3-MoE in MLX: one model class for both, driven by config.json.

A decoder layer is pre-norm attention (GQA, RMSNorm on each q/k head, RoPE) then a pre-norm
feed-forward that is either a SwiGLU MLP or a sparse MoE block (see moe.py). Parameter names are
mlx-lm's, so `sanitize()` is the only place that knows about Hugging Face names.

Speed (see kernels.py, benchmarks/): in decode steps q/k/v (and a dense MLP's gate/up) run as
one matmul over weights concatenated after loading, never renamed on disk. Where fused kernels run (kernels.py),
a decode layer is: attention prologue (norm → qkv → q/k norm → RoPE), cache update, attention,
output projection + residual, then router / gate+up / down (norms folded in). A one-token
decode step runs each layer's cache-free work as one `mx.compile`d function
(QWEN3_MLX_COMPILE=0 turns that off); on MLX's CPU backend CpuDecode reshapes that step
for a backend where graph nodes and BLAS calls, not bandwidth, set the speed.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from . import kernels as fused
from .cache import drop_transposed_keys, transposed_keys
from .config import ModelArgs
from .errors import ConfigError
from .kernels.options import OFF, KernelOptions, KernelPlan, plan_for, use_plan
from .moe import SparseMoeBlock, decode_indices
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


def _update_cache(cache: Any, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """cache.update_and_fetch(k, v) for one new position; a shorter path for plain caches
    with room (same effect as mlx-lm's KVCache, fewer host-side indexing steps)."""
    if type(cache) is KVCache and cache.keys is not None and cache.offset < cache.keys.shape[2]:
        prev = cache.offset
        cache.offset = prev + 1
        cache.keys[:, :, prev : prev + 1, :] = k
        cache.values[:, :, prev : prev + 1, :] = v
        return cache.keys[:, :, : prev + 1, :], cache.values[:, :, : prev + 1, :]
    return cache.update_and_fetch(k, v)


def _offset_array(cache: Any) -> mx.array:
    """The cache's position (int, or one per row for batched caches) as int32 for RoPE."""
    offset = cache.offset
    if isinstance(offset, mx.array):
        return offset.astype(mx.int32)
    return mx.array(offset, dtype=mx.int32)


class CompiledDecode:
    """A one-token decode step as one compiled function per layer boundary.

    step[0] runs layer 0 up to its cache; step[i] (0 < i < n) finishes layer i-1 (o_proj,
    residual, norm, feed-forward) and starts layer i (norm, qkv, q/k norm, RoPE); step[n]
    finishes the last layer and applies the final norm. Only the cache update and the
    attention itself run uncompiled between them, so any mlx-lm cache type works.
    Weights are captured as constants: `Qwen3Model.update()` drops the compiled steps.
    """

    def __init__(self, body: Qwen3Model):
        layers = body.layers
        self.steps = [mx.compile(layers[0].start)]
        for prev, nxt in zip(layers[:-1], layers[1:], strict=True):
            self.steps.append(mx.compile(self._between(prev, nxt)))
        last = layers[-1]
        self.steps.append(mx.compile(lambda attn, h: body.norm(last.finish(attn, h))))
        self.traced: set = set()

    @staticmethod
    def _between(prev: DecoderLayer, nxt: DecoderLayer):
        def step(attn, h, offset):
            h = prev.finish(attn, h)
            return (h, *nxt.start(h, offset))

        return step

    def trace(self, body: Qwen3Model, h: mx.array, offset: mx.array) -> None:
        """Trace every step for this input signature before a cache is touched.

        Tracing is where an unsupported op would fail; doing it up front (on lazy
        placeholders that are never evaluated) keeps a failure from leaving caches half-updated.
        """
        signature = (h.shape, h.dtype, offset.shape)
        if signature in self.traced:
            return
        attn = body.layers[0].self_attn
        placeholder = mx.zeros((h.shape[0], attn.n_heads, 1, attn.head_dim), h.dtype)
        self.steps[0](h, offset)
        for step in self.steps[1:-1]:
            step(placeholder, h, offset)
        self.steps[-1](placeholder, h)
        self.traced.add(signature)

    def __call__(self, body: Qwen3Model, h: mx.array, cache: list, offset: mx.array) -> mx.array:
        mask = create_attention_mask(h, cache[0])
        q, k, v = self.steps[0](h, offset)
        last = len(body.layers) - 1
        kernel_attention = None  # decided once per step: the layers' caches advance together
        for i, (layer, layer_cache) in enumerate(zip(body.layers, cache, strict=True)):
            keys, values = _update_cache(layer_cache, k, v)
            if kernel_attention is None:
                kernel_attention = (
                    body.kernel_plan.attention
                    and all(type(c) is type(layer_cache) for c in cache)
                    and fused.decode_attention_covered(q, keys, values, mask, layer_cache)
                )
            attn_layer = layer.self_attn
            if kernel_attention:
                attn = fused.decode_attention(q, keys, values, attn_layer.scale, attn_layer)
            else:
                # Heads stay unmerged: a transpose + reshape is two more host dispatches.
                attn = attn_layer.attend(q, keys, values, mask, layer_cache, merge=False)
            if i < last:
                h, q, k, v = self.steps[i + 1](attn, h, offset)
            else:
                h = self.steps[-1](attn, h)
        return h


class CpuDecode:
    """A one-token decode step for MLX's CPU backend, plain KV caches (mlx-lm's KVCache).

    On that backend each graph node costs microseconds of dispatch and allocation, kernels
    are scalar, and matmuls go through the reference BLAS bundled with the mlx[cpu] wheel
    (A @ B.T runs as dependent dot products, A @ B as streaming updates, ~2x faster). So,
    with the reference path's arithmetic (bitwise equal on x86-64), the step has about
    half the graph nodes of the general one (tiny preset: ~215 vs ~430; mlx-lm: ~715):
    - RoPE's cos/sin are computed once per step (every layer shares the position), and
      each layer's q/k RMSNorm and RoPE are one fused kernel over all q and k heads;
    - attention reads each KV head once for its whole group of query heads (SDPA's CPU
      fallback makes one matmul per query head), the softmax scale is folded into q, and
      q @ K^T runs against a transposed copy of the keys (cache.transposed_keys);
    - the token embedding runs inside the first compiled function (embed_rows), and MoE
      blocks take their decode path (SparseMoeBlock.decode).
    Weights are captured as constants, as in CompiledDecode.
    """

    def __init__(self, body: Qwen3Model):
        self.body = body
        self.supported = self.supports(body)
        if not self.supported:
            return
        attn = body.layers[0].self_attn
        self.inv_freq, self.position_scale = attn.rope.frequencies()
        self.consts = [self._layer_consts(layer) for layer in body.layers]
        self.moe_indices: dict = {}
        self.traced: set = set()
        self.steps = [mx.compile(self._first)]
        self.steps += [mx.compile(self._between(i)) for i in range(1, len(body.layers))]
        self.steps.append(mx.compile(self._last))

    @staticmethod
    def supports(body: Qwen3Model) -> bool:
        """Stock layers only (a sharded or otherwise replaced module keeps the general step)."""
        for layer in body.layers:
            attn = layer.self_attn
            if type(attn) is not Attention or type(layer.mlp) not in (SparseMoeBlock, MLP):
                return False
            qkv = fuse(attn, "_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is None or attn.q_norm.eps != attn.k_norm.eps or attn.head_dim % 2:
                return False
        return True

    @staticmethod
    def _layer_consts(layer: DecoderLayer) -> dict:
        """q/k norm weights per head (q heads, then k heads) as (heads, 2, head_dim / 2), the
        same with the two halves swapped, and the softmax scale per head (1 for k)."""
        attn = layer.self_attn
        nq, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        weight = mx.concatenate(
            [mx.broadcast_to(attn.q_norm.weight, (nq, hd)),
             mx.broadcast_to(attn.k_norm.weight, (nkv, hd))]
        ).reshape(nq + nkv, 2, hd // 2)  # fmt: skip
        scale = mx.array([attn.scale] * nq + [1.0] * nkv, dtype=attn.q_norm.weight.dtype)
        consts = {
            "weight": weight,
            "weight_swapped": mx.contiguous(weight[:, ::-1]),
            "scale": scale.reshape(-1, 1, 1),
        }
        mx.eval(consts)
        return consts

    def _rope_table(self, offset: mx.array, dtype) -> tuple[mx.array, mx.array]:
        """cos and signed sin of one position, (2, head_dim / 2) each: a head's halves x1, x2
        rotate to (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + swap(x) * signed_sin."""
        theta = (offset.astype(mx.float32) * self.position_scale) * self.inv_freq
        theta = mx.broadcast_to(theta, (2, self.inv_freq.size))
        sign = mx.array([[-1.0], [1.0]], dtype=dtype)
        return mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype) * sign

    def _start(self, i: int, h: mx.array, cos: mx.array, sin: mx.array):
        """Layer i's input → q (B, kv_heads, group, head_dim), k and v (B, kv_heads, 1, hd)."""
        layer = self.body.layers[i]
        attn, c = layer.self_attn, self.consts[i]
        B, nq, nkv, hd = h.shape[0], attn.n_heads, attn.n_kv_heads, attn.head_dim
        heads = attn._qkv(layer.input_layernorm(h)).reshape(B, nq + 2 * nkv, 2, hd // 2)
        # RMSNorm as mx.fast.rms_norm computes it on CPU, applied to the halves and to their
        # swapped view alike, then RoPE and q's softmax scale: one fused kernel.
        qk = heads[:, : nq + nkv]
        x = qk.astype(mx.float32)
        inv_rms = mx.rsqrt(mx.mean(mx.square(x), axis=(-2, -1), keepdims=True) + attn.q_norm.eps)
        normed = (x * inv_rms).astype(h.dtype) * c["weight"]
        swapped = (qk[:, :, ::-1].astype(mx.float32) * inv_rms).astype(h.dtype)
        qk = (normed * cos + swapped * c["weight_swapped"] * sin) * c["scale"]
        q = qk[:, :nq].reshape(B, nkv, nq // nkv, hd)
        k = qk[:, nq:].reshape(B, nkv, 1, hd)
        v = heads[:, nq + nkv :].reshape(B, nkv, 1, hd)
        return q, k, v

    def _finish(self, i: int, attn_out: mx.array, h: mx.array) -> mx.array:
        """Attention output (B, kv_heads, group, head_dim) and layer input h → layer output."""
        layer = self.body.layers[i]
        B = h.shape[0]
        h = h + layer.self_attn.o_proj(attn_out.reshape(B, 1, -1))
        normed = layer.post_attention_layernorm(h)
        if isinstance(layer.mlp, SparseMoeBlock):
            return layer.mlp.decode(normed, h, *self.moe_indices[B, layer.mlp.top_k])
        return layer.mlp(normed, residual=h)

    def _first(self, tokens: mx.array, offset: mx.array):
        h = embed_rows(self.body.embed_tokens, tokens)
        cos, sin = self._rope_table(offset, h.dtype)
        return (h, cos, sin, *self._start(0, h, cos, sin))

    def _between(self, i: int):
        def step(attn_out, h, cos, sin):
            h = self._finish(i - 1, attn_out, h)
            return (h, *self._start(i, h, cos, sin))

        return step

    def _last(self, attn_out: mx.array, h: mx.array) -> mx.array:
        return self.body.norm(self._finish(len(self.body.layers) - 1, attn_out, h))

    def trace(self, tokens: mx.array, offset: mx.array) -> None:
        """Trace every step for this batch size before a cache is touched (CompiledDecode.trace)."""
        B = tokens.shape[0]
        if (tokens.shape, tokens.dtype) in self.traced:
            return
        for layer in self.body.layers:  # constants of the trace: made before it
            if isinstance(layer.mlp, SparseMoeBlock):
                key = (B, layer.mlp.top_k)
                self.moe_indices.setdefault(key, decode_indices(*key))
        h, cos, sin, q, _, _ = self.steps[0](tokens, offset)
        placeholder = mx.zeros(q.shape, q.dtype)
        for step in self.steps[1:-1]:
            step(placeholder, h, cos, sin)
        self.steps[-1](placeholder, h)
        self.traced.add((tokens.shape, tokens.dtype))

    def __call__(self, tokens: mx.array, cache: list, offset: mx.array) -> mx.array:
        h, cos, sin, q, k, v = self.steps[0](tokens, offset)
        last = len(cache) - 1
        for i, layer_cache in enumerate(cache):
            position = layer_cache.offset
            _, values = _update_cache(layer_cache, k, v)
            # Scores against all the capacity of the transposed keys (BLAS needs them
            # contiguous), then cut to the filled positions.
            scores = (q @ transposed_keys(layer_cache, k, position))[..., : position + 1]
            out = mx.softmax(scores, axis=-1, precise=True) @ values
            if i < last:
                h, q, k, v = self.steps[i + 1](out, h, cos, sin)
            else:
                h = self.steps[-1](out, h)
        return h


def embed_rows(embedding: nn.Module, tokens: mx.array) -> mx.array:
    """embedding(tokens), a quantized table's rows dequantized in one fused kernel (MLX's
    CPU dequantize makes one kernel per bit position, then concatenates); same arithmetic."""
    bits = getattr(embedding, "bits", None)
    if type(embedding) is not nn.QuantizedEmbedding or embedding.mode != "affine" or 32 % bits:
        return embedding(tokens)
    group = embedding.group_size
    words = embedding["weight"][tokens]  # (..., dims * bits / 32) uint32
    scales, biases = embedding["scales"][tokens], embedding["biases"][tokens]
    words = words.reshape(*scales.shape, group * bits // 32, 1)
    shifts = mx.array(list(range(0, 32, bits)), dtype=mx.uint32)  # a constant, not a node
    values = (words >> shifts) & ((1 << bits) - 1)  # (..., groups, words per group, per word)
    rows = values * scales[..., None, None] + biases[..., None, None]
    return rows.reshape(*scales.shape[:-1], -1)


def compile_mode(value: str | bool | None = None) -> str:
    """The compile switch (None: QWEN3_MLX_COMPILE, default 1): 1/auto (compiled decode:
    CpuDecode on MLX's CPU backend with plain KV caches, else one compiled function per layer
    boundary), layer (always the latter) or 0.

    (The whole step as ONE compiled function, cache update and masked attention inside, was
    measured slower on the H200: 121 vs 145 tok/s; see benchmarks/results/h200_notes.md.)
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    name = "compile" if value is not None else "QWEN3_MLX_COMPILE"
    text = str(value if value is not None else os.environ.get(name, "1")).strip().lower()
    if text not in ("0", "1", "auto", "layer"):
        raise ConfigError(f"{name}={text!r}: expected 0, 1, auto or layer")
    return text


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
            offset = _offset_array(cache[0]) if step is not None else None
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

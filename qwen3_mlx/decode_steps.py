"""The one-token decode step, compiled (model.py's `Qwen3Model` picks one).

`CompiledDecode` runs each layer's cache-free work as one `mx.compile`d function, with the cache
update and attention between them; `CpuDecode` reshapes that step for MLX's CPU backend, where
graph nodes and BLAS calls, not bandwidth, set the speed. `compile_mode` parses the switch once
(QWEN3_MLX_COMPILE, or `load(..., compile=)`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from . import kernels as fused
from .cache import transposed_keys
from .errors import ConfigError
from .layers import MLP, Attention, DecoderLayer, fuse
from .moe import SparseMoeBlock, decode_indices

if TYPE_CHECKING:
    from .model import Qwen3Model


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


def offset_array(cache: Any) -> mx.array:
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
        # A cache of left-padded rows that says where each starts (the server's batch) needs
        # its mask only if the attention kernel does not run.
        starts = getattr(cache[0], "row_starts", None)
        mask = None if starts is not None else create_attention_mask(h, cache[0])
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
                if not kernel_attention and starts is not None:
                    mask = create_attention_mask(h, cache[0])
            attn_layer = layer.self_attn
            if kernel_attention:
                attn = fused.decode_attention(q, keys, values, attn_layer.scale, attn_layer, starts)
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
        normed = (x * inv_rms).astype(qk.dtype) * c["weight"]
        swapped = (qk[:, :, ::-1].astype(mx.float32) * inv_rms).astype(qk.dtype)
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
        # q and k's dtype, not the lookup's: a float-mode (mxfp4...) table looks up bfloat16,
        # which a float32 model's norms promote.
        dtype = mx.result_type(h, self.body.layers[0].input_layernorm.weight)
        cos, sin = self._rope_table(offset, dtype)
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

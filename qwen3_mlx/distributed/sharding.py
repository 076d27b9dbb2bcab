"""Splitting a Qwen3 model over ranks: tensor, expert and pipeline parallelism.

`shard_model` rewrites a model in place (loaded, or lazy before loading); `rank_slices` says which
slice of which checkpoint tensor each rank then holds — the two must agree, and loading checks
that they do (every parameter present, every shape right).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map
from mlx_lm.models.base import create_attention_mask

from ..config import ModelArgs
from ..errors import DistributedError
from ..model import MLP, Model, Qwen3Model
from ..moe import SparseMoeBlock
from .job import RankSync, Sharding

PARALLEL_MODES = ("tensor", "expert", "pipeline")
# In expert mode, at least this many (token, expert) pairs are worth a host sync to compute only
# the local pairs; below it (decode), non-local pairs run on a local expert with weight 0.
EP_COMPACT_PAIRS = 256


class ExpertParallelMoE(SparseMoeBlock):
    """A SparseMoeBlock holding experts [offset, offset + local_experts) of this rank only.

    Made by re-classing the block (`shard_model`), so parameter names and every attribute the
    kernels rely on stay as they are; only the call changes.
    """

    group: Any
    expert_offset: int
    local_experts: int

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        indices, scores = self.route(x)  # every rank routes every token: the router is replicated
        local = indices.astype(mx.int32) - self.expert_offset
        mine = (local >= 0) & (local < self.local_experts)
        if x.ndim > 2 and x.shape[-2] > 1 and indices.size >= EP_COMPACT_PAIRS:
            y = self._local_pairs(x, local, mine, scores)  # prefill: worth a host sync
        else:  # decode (possibly compiled): a static shape; others' experts count 0
            # ... and run on an expert this token uses here anyway: no extra weights to read.
            first = mx.take_along_axis(local, mx.argmax(mine, axis=-1, keepdims=True), axis=-1)
            spare = mx.where(mine.any(axis=-1, keepdims=True), first, 0)
            y = self.switch_mlp(
                x, mx.where(mine, local, spare).astype(mx.uint32), mx.where(mine, scores, 0)
            )
        y = mx.distributed.all_sum(y, group=self.group)
        return y if residual is None else residual + y  # added once, after the sum

    def _local_pairs(self, x, local, mine, scores) -> mx.array:
        """Prefill: run only the (token, expert) pairs whose expert lives here, then scatter back."""
        k, dims = local.shape[-1], x.shape[-1]
        flat = x.reshape(-1, dims)
        pairs = np.flatnonzero(np.array(mine.reshape(-1)))  # host sync: the pair count is data
        out = mx.zeros_like(flat)
        if pairs.size:
            p = mx.array(pairs.astype(np.uint32))
            token = p // k
            y = self.switch_mlp(
                flat[token],
                local.reshape(-1)[p][:, None].astype(mx.uint32),
                scores.reshape(-1)[p][:, None],
            )
            out = out.at[token].add(y)
        return out.reshape(x.shape)


class TensorParallelMoE(SparseMoeBlock):
    """A SparseMoeBlock whose every expert holds 1/N of its hidden units (Megatron-style)."""

    group: Any

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        indices, scores = self.route(x)
        y = mx.distributed.all_sum(self.switch_mlp(x, indices, scores), group=self.group)
        return y if residual is None else residual + y


@dataclass
class Stage:
    """One rank's place in the pipeline. Rank 0 is the last stage: it holds the logits."""

    rank: int
    size: int
    start: int  # first layer (global index)
    end: int
    has_embedding: bool
    has_head: bool  # final norm + lm_head
    group: Any = None

    @property
    def is_first(self) -> bool:
        return self.rank == self.size - 1

    @property
    def is_last(self) -> bool:
        return self.rank == 0


def pipeline_stage(args: ModelArgs, rank: int, size: int, split: list[int] | None = None) -> Stage:
    """Layers per stage: even, the earliest stages take the remainder (rank 0 also runs the head)."""
    n = args.num_hidden_layers
    if split is None:
        base, extra = divmod(n, size)
        split = [base + (1 if size - 1 - r < extra else 0) for r in range(size)]
    if len(split) != size or any(s <= 0 for s in split) or sum(split) != n:
        raise DistributedError(
            f"pipeline split {split}: needs {size} positive layer counts summing to {n}"
        )
    start = sum(split[rank + 1 :])  # rank size-1 runs the first layers, rank 0 the last
    first, last = rank == size - 1, rank == 0
    return Stage(
        rank, size, start, start + split[rank],
        has_embedding=first or (last and args.tie_word_embeddings),
        has_head=last,
    )  # fmt: skip


class PipelineBody(Qwen3Model):
    """This stage's layers: receive from the previous stage (or embed), run, send to the next."""

    stage: Stage

    def __call__(self, inputs: mx.array, cache: list | None = None, input_embeddings=None):
        stage = self.stage
        layers = self.layers[stage.start :]
        dtype = layers[0].input_layernorm.weight.dtype  # the activations' dtype on every stage
        if stage.is_first:
            h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        else:
            given = inputs if inputs is not None else input_embeddings  # its shape only
            shape = (*given.shape[:2], layers[0].input_layernorm.weight.shape[0])
            h = mx.distributed.recv(shape, dtype, stage.rank + 1, group=stage.group)
        cache = cache or [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        if stage.is_last:
            return self.norm(h)
        h = mx.distributed.send(h.astype(dtype), stage.rank - 1, group=stage.group)
        _tie_cache(cache[-1], h)
        return h


def _tie_cache(cache: Any, h: mx.array) -> None:
    """Make the cache depend on the send: prefill evaluates only the caches, and the next stage
    waits for this send."""
    depend_on = getattr(cache, "depend_on", None)  # the server's slots hold their arrays apart
    if depend_on is not None:
        return depend_on(h)
    keys = getattr(cache, "keys", None)
    if isinstance(keys, mx.array):
        cache.keys = mx.depends(keys, h)
    elif isinstance(keys, (tuple, list)):  # QuantizedKVCache: (packed, scales, biases)
        cache.keys = type(keys)(mx.depends(list(keys), h))


class PipelineModel(Model):
    """A Model holding one pipeline stage. Only the last stage (rank 0) has real logits; the others
    return placeholders (zeros) whose evaluation runs their stage — rank 0 samples for everyone."""

    @property
    def layers(self):
        return self.model.layers[self.model.stage.start :]

    def logits(self, hidden: mx.array) -> mx.array:
        if self.model.stage.has_head:
            return super().logits(hidden)
        zero = mx.depends(mx.zeros((1,) * hidden.ndim, mx.float32), hidden)
        return mx.broadcast_to(zero, (*hidden.shape[:-1], self.args.vocab_size))


# -- splitting a model in place --------------------------------------------------------------------


def check_shardable(
    args: ModelArgs, parallel: str, size: int, group_size: int | None = None
) -> None:
    """Raise DistributedError (naming the field) when `args` can't be split `size` ways
    (`group_size`: of quantized weights, whose groups must not straddle two ranks)."""
    if parallel not in PARALLEL_MODES:
        raise DistributedError(
            f"--parallel: expected one of {', '.join(PARALLEL_MODES)}, got {parallel!r}"
        )
    if size == 1:
        return
    if parallel == "pipeline":
        if args.num_hidden_layers < size:
            raise DistributedError(
                f"num_hidden_layers={args.num_hidden_layers}: fewer layers than the {size} ranks"
            )
        return
    group = group_size or 1
    hd = args.head_dim

    def need(ok: bool, what: str):
        if not ok:
            raise DistributedError(f"--parallel {parallel} over {size} ranks: {what}")

    need(
        args.num_attention_heads % size == 0,
        f"num_attention_heads={args.num_attention_heads} is not a multiple of {size}",
    )
    kv = args.num_key_value_heads
    need(
        kv % size == 0 or size % kv == 0,
        f"num_key_value_heads={kv} and {size} ranks: one must divide the other",
    )
    need(
        args.num_attention_heads * hd // size % group == 0,
        f"o_proj's input per rank is not a multiple of group_size={group}",
    )
    if args.intermediate_size and any(
        not args.is_sparse_layer(i) for i in range(args.num_hidden_layers)
    ):
        inter = args.intermediate_size
        need(
            inter % size == 0 and inter // size % group == 0,
            f"intermediate_size={inter} per rank must be a multiple of {group}",
        )
    if args.is_moe:
        if parallel == "expert":
            need(
                args.num_experts % size == 0,
                f"num_experts={args.num_experts} is not a multiple of {size}",
            )
        else:
            m = args.moe_intermediate_size
            need(
                m % size == 0 and m // size % group == 0,
                f"moe_intermediate_size={m} per rank must be a multiple of {group}",
            )


def shard_model(
    model: Model, parallel: str, group: Any, *, pipeline_split: list[int] | None = None
) -> Model:
    """Split `model` over `group` in place and attach `model.distributed`. Works on loaded weights
    and on a not-yet-loaded (lazy) model alike; the loader then fills in this rank's slices."""
    size = group.size()
    check_shardable(model.args, parallel, size, quant_group_size(model))
    if size > 1 and parallel == "pipeline":
        _make_pipeline(model, group, pipeline_split)
    elif size > 1:
        for layer in model.layers:
            _shard_attention(layer.self_attn, group)
            mlp = layer.mlp
            if isinstance(mlp, MLP):
                mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
                mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
                mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
            elif parallel == "expert":
                experts = model.args.num_experts // size
                shard_inplace(mlp.switch_mlp, lambda path, w: 0, group=group)  # axis 0: experts
                mlp.__class__ = ExpertParallelMoE
                mlp.group = group
                mlp.expert_offset = group.rank() * experts
                mlp.local_experts = experts
            else:
                for name in ("gate_proj", "up_proj"):
                    shard_inplace(getattr(mlp.switch_mlp, name), "all-to-sharded", group=group)
                shard_inplace(mlp.switch_mlp.down_proj, "sharded-to-all", group=group)
                mlp.__class__ = TensorParallelMoE
                mlp.group = group
    model.distributed = Sharding(parallel, group, RankSync(group))
    return model


def quant_group_size(model: nn.Module) -> int | None:
    sizes = [m.group_size for _, m in model.named_modules() if hasattr(m, "bits")]
    return max(sizes) if sizes else None


def _shard_attention(attn: Any, group: Any) -> None:
    size = group.size()
    n_kv = attn.n_kv_heads
    if size > n_kv:  # more ranks than KV heads: each rank keeps a copy of the one its queries use
        for name in ("k_proj", "v_proj"):
            _repeat_rows(getattr(attn, name), n_kv, size // n_kv)
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
    attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= size
    attn.n_kv_heads = max(n_kv // size, 1)


def _repeat_rows(linear: nn.Module, heads: int, reps: int) -> None:
    """Repeat each head's block of output rows `reps` times (weight, scales, biases and bias)."""

    def repeat(w: mx.array) -> mx.array:
        rest = w.shape[1:]
        return mx.repeat(w.reshape(heads, -1, *rest), reps, axis=0).reshape(-1, *rest)

    linear.update(tree_map(repeat, linear.parameters()))


def _make_pipeline(model: Model, group: Any, split: list[int] | None) -> None:
    stage = pipeline_stage(model.args, group.rank(), group.size(), split)
    stage.group = group
    body = model.model
    # Layers before this stage become None so parameter names keep their global layer numbers.
    body.layers = [None] * stage.start + body.layers[stage.start : stage.end]
    if not stage.has_embedding:
        body.pop("embed_tokens")
    if not stage.has_head:
        body.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    body.__class__ = PipelineBody
    body.stage = stage
    model.__class__ = PipelineModel


# -- which slice of which tensor each rank holds -----------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Part `part` of `parts` equal parts of a tensor along `axis`."""

    axis: int
    part: int
    parts: int


def rank_slices(
    names: list[str],
    args: ModelArgs,
    parallel: str,
    rank: int,
    size: int,
    pipeline_split: list[int] | None = None,
) -> dict[str, Slice | None]:
    """The parameters rank `rank` holds (full-model names) → the slice of each (None: all of it).

    Mirrors `shard_model`: what `shard_linear`/`shard_inplace` keep of each weight. Quantized
    weights, scales and biases split along the same axes as plain weights."""
    if size == 1:
        return dict.fromkeys(names)
    if parallel == "pipeline":
        stage = pipeline_stage(args, rank, size, pipeline_split)
        keep = {}
        for name in names:
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if layer:
                ok = stage.start <= int(layer.group(1)) < stage.end
            elif name.startswith("model.embed_tokens."):
                ok = stage.has_embedding
            else:  # model.norm, lm_head
                ok = stage.has_head
            if ok:
                keep[name] = None
        return keep
    rows, cols = Slice(0, rank, size), Slice(-1, rank, size)
    kv = args.num_key_value_heads
    kv_rows = rows if size <= kv else Slice(0, rank // (size // kv), kv)
    out: dict[str, Slice | None] = {}
    for name in names:
        *_, module, leaf = name.split(".")
        if ".self_attn." in name:
            spec = {"q_proj": rows, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": cols}.get(
                module
            )
            if module == "o_proj" and leaf == "bias":
                spec = None
        elif ".mlp.switch_mlp." in name:
            if parallel == "expert":
                spec = rows
            else:
                spec = Slice(1, rank, size) if module in ("gate_proj", "up_proj") else cols
        elif ".mlp." in name and module in ("gate_proj", "up_proj"):
            spec = rows
        elif ".mlp." in name and module == "down_proj":
            spec = None if leaf == "bias" else cols
        else:  # norms, embeddings, lm_head, router: every rank holds all of it
            spec = None
        out[name] = spec
    return out

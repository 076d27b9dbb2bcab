"""Qwen3 mixture-of-experts block: router + experts.

Parameter names follow mlx-lm's on-disk layout (`mlp.gate`, `mlp.switch_mlp.{gate,up,down}_proj`
with experts stacked on axis 0) so checkpoints move freely between the two projects.

The reference path runs the experts with `mx.gather_qmm` (quantized) or `mx.gather_mm`.
`Experts.__call__` and `SparseMoeBlock.route` are the seams where fused kernels
(qwen3_mlx.kernels: one router launch, one gate+up+SwiGLU launch, one down+weighted-sum launch)
take over when the module's `kernel_plan` (the model's, set at load) has them on and the shape
and quantization allow it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import kernels as fused
from .kernels.options import OFF, KernelPlan

# Sorting tokens by expert pays off once enough (token, expert) pairs share experts.
SORT_THRESHOLD = 64


def prefill_layout(pairs: int, num_experts: int, plan: KernelPlan) -> str:
    """'blocked' or 'per-pair': how the reference path lays out (token, expert) pairs.

    plan.moe_prefill (QWEN3_MLX_MOE_PREFILL) blocked|per-pair forces one; auto packs pairs into per-expert blocks
    on MLX's CUDA backend once there is at least one pair per expert: its gather_qmm runs one
    tiled GEMM per batch entry, so a one-row entry wastes the tile (measured in
    benchmarks/micro.py). Elsewhere (CPU; Metal's gather_qmm reads sorted rows natively)
    one row per pair stays.
    """
    if plan.moe_prefill != "auto":
        return plan.moe_prefill
    return "blocked" if plan.backend == "cuda" and pairs >= num_experts else "per-pair"


class ExpertLinear(nn.Module):
    """`num_experts` stacked linear layers without bias: weight (E, out, in)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False, rows=None
    ) -> mx.array:
        return mx.gather_mm(
            x,
            self.weight.swapaxes(-1, -2),
            lhs_indices=rows,
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertLinear.from_weight(self.weight, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self._assign(mx.zeros((num_experts, output_dims, input_dims)))
        self.freeze()

    @classmethod
    def from_weight(cls, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = group_size, bits, mode
        layer._assign(weight)
        layer.freeze()
        return layer

    def _assign(self, weight: mx.array):
        self.weight, self.scales, *biases = mx.quantize(
            weight, self.group_size, self.bits, mode=self.mode
        )
        if biases:
            self.biases = biases[0]

    def __call__(
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False, rows=None
    ) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            lhs_indices=rows,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class Experts(nn.Module):
    """All experts of one layer as three stacked projections with SwiGLU."""

    kernel_plan: KernelPlan = OFF  # the model's, set at load (Model.use_kernels)

    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(dims, hidden_dims, num_experts)
        self.up_proj = ExpertLinear(dims, hidden_dims, num_experts)
        self.down_proj = ExpertLinear(hidden_dims, dims, num_experts)

    def __call__(
        self,
        x: mx.array,
        indices: mx.array,
        scores: mx.array,
        residual: mx.array | None = None,
    ) -> mx.array:
        """x (..., D), indices/scores (..., k) → routing-weighted sum of expert outputs (..., D).

        With `residual`, returns residual + that sum (the fused kernel adds it in place).
        """
        if self.kernel_plan.experts and fused.experts_covered(self, x, indices.shape[-1]):
            return fused.moe_experts(self, x, indices, scores, residual)
        y = self.reference(x, indices, scores)
        return y if residual is None else residual + y

    def decode(self, x, indices, scores, residual, rows: mx.array, pairs: mx.array) -> mx.array:
        """x (B, 1, D), indices/scores (B, 1, k) → residual + weighted sum of expert outputs.

        `rows`/`pairs` (decode_indices) say which row of x, then of the gate/up output, each
        (token, expert) pair reads: constants, where gather_(q)mm would build them from
        aranges in every call.
        """
        h = nn.silu(self.gate_proj(x, indices, rows=rows)) * self.up_proj(x, indices, rows=rows)
        y = self.down_proj(h, indices, rows=pairs).squeeze(-2)  # (B, 1, k, D)
        return residual + (y * scores[..., None]).sum(axis=-2).astype(y.dtype)

    def reference(self, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
        plan = self.kernel_plan
        if prefill_layout(indices.size, self.gate_proj.weight.shape[0], plan) == "blocked":
            return self.blocked(x, indices, scores)
        return self.per_pair(x, indices, scores)

    def per_pair(self, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
        """One gather_(q)mm row per (token, expert) pair, expert-sorted from 64 pairs on."""
        shape = indices.shape
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row per token for gather_mm
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            # Expert-sorted order makes gather_(q)mm read each expert's weights contiguously.
            k = shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
        else:
            idx = indices
        h = nn.silu(self.gate_proj(x, idx, do_sort)) * self.up_proj(x, idx, do_sort)
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = mx.unflatten(y[inverse], 0, shape)
        y = y.squeeze(-2)  # (..., k, D)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)

    def blocked(
        self, x: mx.array, indices: mx.array, scores: mx.array, rows: int | None = None
    ) -> mx.array:
        """Prefill: the (token, expert) pairs sorted by expert and packed into blocks of
        `rows` rows that each belong to one expert, so that every batch entry of gather_(q)mm
        is a rows x D matrix product against one expert (tiled matrix units do real work)
        instead of one row per entry. Shapes stay static (no host sync): the block count is
        the most any routing can need, and unused blocks hold zero rows."""
        shape, dims = indices.shape, x.shape[-1]
        k, pairs = shape[-1], indices.size
        num_experts = self.gate_proj.weight.shape[0]
        rows = rows or block_rows(pairs, num_experts)
        filled = min(num_experts, pairs)
        n_blocks = (pairs + filled * (rows - 1)) // rows
        flat = indices.flatten().astype(mx.int32)
        order = mx.argsort(flat)
        counts = mx.zeros((num_experts,), mx.int32).at[flat].add(1)
        padded = (counts + rows - 1) // rows * rows
        padded_end = mx.cumsum(padded)
        padded_start = padded_end - padded
        start = mx.cumsum(counts) - counts
        # Buffer row r lies in block r // rows, which belongs to the first expert whose padded
        # segment ends after the block's first row; its rank within that expert's pairs
        # picks the sorted pair it holds, if any.
        block_first_row = mx.arange(n_blocks, dtype=mx.int32) * rows
        block_expert = (padded_end[None] <= block_first_row[:, None]).sum(-1)
        block_expert = mx.minimum(block_expert, num_experts - 1).astype(mx.int32)
        row_expert = mx.repeat(block_expert, rows)
        rank = mx.arange(n_blocks * rows, dtype=mx.int32) - padded_start[row_expert]
        valid = rank < counts[row_expert]
        sorted_pos = mx.minimum(start[row_expert] + rank, pairs - 1)
        token = order[sorted_pos] // k
        xb = x.reshape(-1, dims)[token] * valid[:, None].astype(x.dtype)
        xb = xb.reshape(n_blocks, rows, dims)
        experts = block_expert.astype(mx.uint32)
        h = nn.silu(self.gate_proj(xb, experts)) * self.up_proj(xb, experts)
        yb = self.down_proj(h, experts).reshape(n_blocks * rows, dims)
        # Pair p (original order) sits at buffer row padded_start[e] + (its sorted rank in e).
        inverse = mx.zeros((pairs,), mx.int32).at[order].add(mx.arange(pairs, dtype=mx.int32))
        row_of_pair = padded_start[flat] + inverse - start[flat]
        y = yb[row_of_pair].reshape(*shape, dims)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


def decode_indices(batch: int, top_k: int) -> tuple[mx.array, mx.array]:
    """(rows, pairs), both (batch, 1, top_k) uint32: the token row of each (token, expert)
    pair, and the pair's own index, for Experts.decode."""
    rows = mx.broadcast_to(mx.arange(batch, dtype=mx.uint32)[:, None, None], (batch, 1, top_k))
    pairs = mx.arange(batch * top_k, dtype=mx.uint32).reshape(batch, 1, top_k)
    rows = mx.contiguous(rows)
    mx.eval(rows, pairs)
    return rows, pairs


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows per expert block: about the mean pairs per expert, 16 to 64 (MLX's GEMM tiles)."""
    mean = pairs / num_experts
    return next((r for r in (16, 32) if mean <= r), 64)


class SparseMoeBlock(nn.Module):
    kernel_plan: KernelPlan = OFF  # the model's, set at load (Model.use_kernels)

    def __init__(
        self, dims: int, hidden_dims: int, num_experts: int, top_k: int, norm_topk_prob: bool
    ):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(dims, num_experts, bias=False)
        self.switch_mlp = Experts(dims, hidden_dims, num_experts)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Softmax over all experts (in float32), keep the top-k, optionally renormalise."""
        num_experts = self.gate.weight.shape[0]
        if self.kernel_plan.router and fused.router_covered(self.gate, x, num_experts, self.top_k):
            indices, scores, _ = fused.moe_router(x, self.gate, self.top_k, self.norm_topk_prob)
            return indices, scores
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        # Integer indices carry no gradient (training and fine-tuning differentiate route()).
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return indices, scores.astype(x.dtype)

    def __call__(
        self, x: mx.array, residual: mx.array | None = None, norm: nn.RMSNorm | None = None
    ) -> mx.array:
        """(residual +) the block's output for x, or for norm(x) when `norm` is given.

        With `norm`, the fused router kernel normalises x itself and hands the normalised
        rows to the expert kernels (no separate norm launch).
        """
        if norm is not None:
            if self._fused_ok(x):
                indices, scores, normed = fused.moe_router(
                    x, self.gate, self.top_k, self.norm_topk_prob, norm=norm
                )
                return fused.moe_experts(self.switch_mlp, normed, indices, scores, residual)
            x = norm(x)
        indices, scores = self.route(x)
        return self.switch_mlp(x, indices, scores, residual)

    def decode(self, x: mx.array, residual: mx.array, rows: mx.array, pairs: mx.array):
        """residual + the block's output for x (B, 1, D), one token per row, on the reference
        path (the CPU decode step); `rows`/`pairs`: decode_indices(B, top_k)."""
        indices, scores = self.route(x)
        return self.switch_mlp.decode(x, indices, scores, residual, rows, pairs)

    def _fused_ok(self, x: mx.array) -> bool:
        num_experts = self.gate.weight.shape[0]
        sw = self.switch_mlp
        return (
            self.kernel_plan.router
            and sw.kernel_plan.experts
            and fused.router_covered(self.gate, x, num_experts, self.top_k)
            and fused.experts_covered(sw, x, self.top_k)
        )

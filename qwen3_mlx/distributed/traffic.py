"""What each parallel mode sends between ranks per token, and the weights each rank holds,
computed from a model's shapes alone."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..errors import DistributedError
from ..loading import build_model, quantization_of
from .sharding import PARALLEL_MODES, check_shardable, rank_slices


def traffic_per_token(
    args: ModelArgs, parallel: str, ranks: int, *, activation_bytes: int = 2, batch: int = 1
) -> dict[str, Any]:
    """What one decode step of `batch` tokens sends between ranks, from the shapes alone.

    A ring all-reduce of n bytes over N ranks sends 2(N−1)/N·n bytes from each rank in 2(N−1)
    sequential steps; a pipeline hop sends the hidden state once. Every mode also all-reduces the
    sampled tokens (4 bytes each) so all ranks continue with rank 0's."""
    hidden = batch * args.hidden_size * activation_bytes
    ring = 2 * (ranks - 1) / ranks
    token = 4 * batch
    if parallel == "pipeline":
        hops = ranks - 1
        per_rank = hidden + token * ring  # the busiest rank sends one hidden state
        total = hops * hidden + ranks * token * ring
        messages = hops + 2 * (ranks - 1)
        allreduces = 1
    else:
        allreduces = 2 * args.num_hidden_layers + 1  # after attention and after MLP/MoE, + tokens
        per_rank = 2 * args.num_hidden_layers * hidden * ring + token * ring
        total = ranks * per_rank
        messages = allreduces * 2 * (ranks - 1)
    return {
        "parallel": parallel,
        "ranks": ranks,
        "batch": batch,
        "all_reduces": allreduces,
        "pipeline_hops": ranks - 1 if parallel == "pipeline" else 0,
        "bytes_sent_per_rank": round(per_rank),
        "bytes_total": round(total),
        "sequential_messages": messages,
    }


def rank_weight_bytes(config: dict, parallel: str, ranks: int) -> list[int]:
    """Weight bytes each rank holds for `config` (quantized as its "quantization" says), computed
    from the shapes of a lazy model: nothing is allocated."""
    model = build_model(config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype in ("bfloat16", "float16"):
        model.set_dtype(getattr(mx, dtype))
    quantization = quantization_of(config)
    if quantization:
        q = {"group_size": int(quantization["group_size"]), "bits": int(quantization["bits"])}
        nn.quantize(
            model,
            **q,
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and model.quant_predicate(p, m),
        )
    params = dict(tree_flatten(model.parameters()))
    out = []
    for rank in range(ranks):
        plan = rank_slices(list(params), model.args, parallel, rank, ranks)
        out.append(sum(params[n].nbytes // (part.parts if part else 1) for n, part in plan.items()))
    return out


QWEN3_235B_A22B = {
    "model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "tie_word_embeddings": False, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}  # fmt: skip


def traffic_table(config: dict, ranks_list: list[int], bits: int | None = 4) -> str:
    """A markdown table: traffic per decoded token and per 1,000 prompt tokens, and per-rank
    weights, for each mode and rank count (bf16 activations, batch 1)."""
    args = ModelArgs.from_dict(config)
    config = dict(config)
    if bits:
        config["quantization"] = {"group_size": 64, "bits": bits}
    total = sum(rank_weight_bytes(config, "tensor", 1))
    lines = [
        f"Weights: {total / 1e9:.1f} GB" + (f" at {bits}-bit (router 8-bit)" if bits else ""),
        "",
        "| mode | ranks | collectives / token | sent per rank / token | sent per rank / 1k-token prompt "
        "| sequential messages / token | weights per rank (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ranks in ranks_list:
        for parallel in PARALLEL_MODES:
            try:
                check_shardable(args, parallel, ranks, bits and 64)
            except DistributedError as e:
                lines.append(f"| {parallel} | {ranks} | n/a: {e} | | | | |")
                continue
            t = traffic_per_token(args, parallel, ranks)
            prefill = traffic_per_token(args, parallel, ranks, batch=1000)["bytes_sent_per_rank"]
            per_rank = max(rank_weight_bytes(config, parallel, ranks))
            hops = f" + {t['pipeline_hops']} send/recv" if t["pipeline_hops"] else ""
            lines.append(
                f"| {parallel} | {ranks} | {t['all_reduces']} all-reduce{hops} "
                f"| {_size(t['bytes_sent_per_rank'])} | {_size(prefill)} "
                f"| {t['sequential_messages']} | {per_rank / 1e9:.1f} GB |"
            )
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"

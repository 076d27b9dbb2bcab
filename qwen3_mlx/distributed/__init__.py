"""Qwen3 across processes and machines with MLX's own distributed layer (`mx.distributed`).

Launch every rank with `mlx.launch` (ring over TCP between Macs, JACCL over Thunderbolt RDMA, MPI,
NCCL on MLX's CUDA backend). Three ways to split the model, chosen with `--parallel`:

  tensor    attention heads, dense-MLP and expert hidden units split over the ranks; an all-reduce
            of one hidden vector after attention and after the MLP/MoE of every layer.
  expert    attention split as in `tensor`; each MoE layer's experts split over the ranks: rank r
            holds experts [r·E/N, (r+1)·E/N), routes every token with the (replicated) router,
            computes only its own experts' share, and an all-reduce sums the shares.
  pipeline  whole layers split over the ranks; activations go rank to rank with send/recv, rank 0
            runs the last layers and holds the logits. One hop per stage per token: for slow links.

Modules: `job` (joining the job; `RankSync`, `share_tokens`: the lockstep rules), `watchdog`
(a lost rank ends the job with an error naming it), `sharding` (the three modes), `checkpoint`
(reading only this rank's slices; pre-split checkpoints), `traffic` (bytes per token from shapes).

    group = distributed.init()                         # under mlx.launch; 1 rank otherwise
    model, tokenizer = distributed.load(path, "expert", group)
    with distributed.session():                        # errors end the job on every rank
        ... the usual generate loop, with tokens = distributed.share_tokens(model, tokens)
"""

from .checkpoint import (
    Checkpoint,
    load,
    load_sharded,
    model_directory,
    split_checkpoint,
    weight_bytes,
)
from .job import (
    LaunchInfo,
    RankSync,
    Sharding,
    init,
    is_leader,
    launch_info,
    session,
    share_tokens,
)
from .sharding import (
    PARALLEL_MODES,
    ExpertParallelMoE,
    PipelineModel,
    Slice,
    TensorParallelMoE,
    check_shardable,
    pipeline_stage,
    rank_slices,
    shard_model,
)
from .traffic import QWEN3_235B_A22B, rank_weight_bytes, traffic_per_token, traffic_table
from .watchdog import EXIT_LOST_RANK, Watchdog

__all__ = [
    "EXIT_LOST_RANK", "PARALLEL_MODES", "QWEN3_235B_A22B", "Checkpoint", "ExpertParallelMoE",
    "LaunchInfo", "PipelineModel", "RankSync", "Sharding", "Slice", "TensorParallelMoE",
    "Watchdog", "check_shardable", "init", "is_leader", "launch_info", "load", "load_sharded",
    "model_directory", "pipeline_stage", "rank_slices", "rank_weight_bytes", "session",
    "shard_model", "share_tokens", "split_checkpoint", "traffic_per_token", "traffic_table",
    "weight_bytes",
]  # fmt: skip

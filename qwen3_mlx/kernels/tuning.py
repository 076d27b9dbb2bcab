"""Coverage limits and launch shapes of the fused kernels, chosen by measurement.

The figures that chose each constant are in benchmarks/results/ (benchmarks/tune_kernels.py
re-measures a set of them). The kernel modules read them as `tuning.NAME` at launch time.
"""

from __future__ import annotations

import math

import mlx.core as mx

# Coverage of the quantized kernels.
MOE_BITS = (4, 8)
MOE_GROUP_SIZES = (32, 64, 128)
MAX_DECODE_TOKENS = 32  # tokens a decode kernel takes (gate+up lists pairs in threadgroup memory)
# Arrival counters per split-kernel call site: one per (token, router) or (token group, head)
TICKETS = 4096
FLOAT_TYPES = (mx.bfloat16, mx.float16, mx.float32)

# Launch shapes (warps per threadgroup, output rows per warp).
GATE_UP_WARPS, GATE_UP_ROWS, GATE_UP_ROWS_ONE_TOKEN = 4, 2, 4
GATE_UP_PAIRS = 2  # pairs of one expert sharing each weight load
DOWN_WARPS, DOWN_ROWS = 4, 2
LINEAR_WARPS, LINEAR_ROWS = 4, 2
# Tokens sharing one pass over the weights. Few per pass keep more threadgroups busy (the
# output projection at batch 8: 2 per pass gave +11% decode over 8); the lm_head's 150k rows
# give parallelism enough, and each extra pass over its 150 MB would cost more.
LINEAR_TOKENS, LOGITS_TOKENS = 2, 8
# Above these token counts the output projection / the lm_head go to MLX's quantized_matmul.
# At batch 8 on the H200 that was 1-20% slower per decode step than these kernels (whole-step
# variants of benchmarks/tune_kernels.py, h200_notes.md), so both cover every decode size.
LINEAR_MAX_TOKENS = MAX_DECODE_TOKENS
LOGITS_MAX_TOKENS = MAX_DECODE_TOKENS
# The router's gate logits for one token are spread over ROUTER_SPLIT threadgroups (SMs) of
# ROUTER_EXPERTS_PER_WARP experts per warp; the last to finish picks the top k.
ROUTER_SPLIT, ROUTER_EXPERTS_PER_WARP = 8, 4
# Backends where split kernels hand work across threadgroups (tickets, device-scope fences).
# Metal's hand-off (Metal 3.2 fences; maybe coherent(device) buffers) is unvalidated, so
# there the router and prologue keep one threadgroup per token / head.
SPLIT_BACKENDS = ("cuda",)
ROPE_THREADS = 128
# The attention prologue spreads each head's rows over PROLOGUE_SPLIT threadgroups (1: one
# threadgroup per head), PROLOGUE_ROWS_PER_WARP rows per warp, at most PROLOGUE_THREADS.
PROLOGUE_SPLIT, PROLOGUE_ROWS_PER_WARP = 4, 4
PROLOGUE_THREADS = 256
PROLOGUE_CHUNKS_IN_FLIGHT = 8  # 16-byte weight chunks per lane the prologue requests at once
PROLOGUE_TOKENS = 4  # tokens sharing each weight load
PROLOGUE_MAX_ACC = 8  # accumulators per lane (rows x tokens)
# Decode attention: keys per split of the cache, at most MAX splits (a power of two: the
# arrival counters wrap at 2^32; <= 32: the merge gives each split a lane), query heads per
# threadgroup, threads per threadgroup (256: the H200 profile of 128 showed one warp per
# scheduler, stalled on latency; there are only splits x KV heads threadgroups at batch 1).
ATTENTION_SPLIT_KEYS, ATTENTION_MAX_SPLITS = 32, 32
ATTENTION_HEADS, ATTENTION_THREADS = 8, 256
# Shorter caches stay on MLX's attention: its vector kernel takes ~10 us per 30B layer at 128
# keys on the H200 and is cheaper to dispatch (this kernel is called outside the compiled
# steps, where MLX rebuilds a custom kernel's source text at every call). From 256 keys on
# MLX switches to cuDNN (21 us per layer at 2048 keys; this kernel 12.9 us).
ATTENTION_MIN_KEYS = 1024
# Query heads per KV head whose launch shapes have passed the GPU tests on the H200 (0.6B-1.7B:
# 2; 4B, 8B: 4; 14B: 5; 30B, 32B: 8; 235B: 16).
ATTENTION_CHECKED_GROUPS = (2, 4, 5, 8, 16)
LOG2_E = math.log2(math.e)  # the kernel's softmax runs in base 2

"""Rotary position embeddings, plain or YaRN-scaled, on top of `mx.fast.rope`.

Qwen3 extends its 32,768-token native context to 131,072 with YaRN
(`rope_scaling = {"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}`). YaRN changes two things:
the per-dimension frequencies (interpolated for slow dimensions, kept for fast
ones, blended on a linear ramp) and a constant "attention factor" that scales
cos/sin. Scaling both q and k by that factor equals scaling the attention
logits by its square, so `attention_scale` hands it to the attention instead of
spending two multiplies per step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def yarn_periods(head_dim: int, base: float, scaling: dict) -> tuple[mx.array, float]:
    """Return (periods for mx.fast.rope, attention factor) for a YaRN config."""
    factor = float(scaling["factor"])
    original_max = scaling.get("original_max_position_embeddings")
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        # Dimension index whose wavelength completes `rotations` turns over the original context.
        return head_dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001

    exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    extrapolated = 1.0 / (base**exponents)  # inverse frequencies as trained
    interpolated = extrapolated / factor
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1 for fast-rotating dims (kept), 0 for slow ones (interpolated)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    periods = 1.0 / inv_freq
    # Computed now, on the loading thread: a lazy array made on one thread can't be evaluated
    # on another (the server's engine thread), and these are not parameters that
    # `mx.eval(model.parameters())` would reach.
    mx.eval(periods)
    return periods, float(attention_factor)


class RoPE(nn.Module):
    """Non-traditional (half-split) RoPE as Qwen3 uses it, with optional scaling."""

    def __init__(
        self,
        head_dim: int,
        base: float,
        scaling: dict | None = None,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.scale = 1.0
        self.attention_factor = 1.0
        self._periods = None
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "yarn":
            scaling = dict(scaling)
            scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
            self._periods, self.attention_factor = yarn_periods(head_dim, base, scaling)
        elif rope_type == "linear":
            self.scale = 1.0 / float(scaling["factor"])

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self._periods is not None:
            return mx.fast.rope(
                x,
                self.head_dim,
                traditional=False,
                base=None,
                scale=1.0,
                offset=offset,
                freqs=self._periods,
            )
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.base, scale=self.scale, offset=offset
        )

    def frequencies(self) -> tuple[mx.array, float]:
        """(inverse frequencies float32 (head_dim / 2), position scale), computed the way
        mx.fast.rope's CPU fallback computes them (the CPU decode step matches it bitwise)."""
        if self._periods is not None:
            inv, scale = mx.reciprocal(self._periods.astype(mx.float32)), 1.0
        else:
            half = self.head_dim // 2
            step = mx.array(math.log(self.base) / half, dtype=mx.float32)
            inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * step)
            scale = self.scale
        mx.eval(inv)
        return inv, scale

    @property
    def attention_scale(self) -> float:
        """Multiplier for the attention logits (YaRN's attention factor, squared)."""
        return self.attention_factor**2

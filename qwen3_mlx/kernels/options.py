"""Which fused kernels a model runs: the switches, parsed once, and the plan the model holds.

`KernelOptions` is what a user asks for (environment or `load(..., kernels=...)`); `KernelPlan`
is what runs, one flag per call site, decided once when a model is loaded (`plan_for`). The
model's layers read their plan's flags: nothing on the decode path reads the environment.

  QWEN3_MLX_KERNELS=0|1|auto       all fused kernels
  QWEN3_MLX_MOE_KERNELS=0|1|auto   the MoE kernels (router, gate+up, down); overrides the above
  QWEN3_MLX_ROUTER_KERNEL=0        route on the reference ops, the other kernels still fused
  QWEN3_MLX_ATTENTION_KERNEL=0     decode attention through MLX's scaled_dot_product_attention
  QWEN3_MLX_MOE_PREFILL=auto|blocked|per-pair   the reference MoE path's layout (moe.py)

"0" forces the reference ops; "1" demands the kernels (an error on a backend without them) and
runs them unchecked; "auto" (the default) runs each kernel that has passed its check on this
device (`kernels.check`: correct on random inputs, cached on disk per GPU, MLX version and
kernel source).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx

from ..errors import ConfigError
from .build import backend as launch_backend

SWITCH_VALUES = ("0", "1", "auto")
PREFILL_LAYOUTS = ("auto", "blocked", "per-pair")

# The plan's flags, each with the kernels it launches.
FLAG_KERNELS: dict[str, tuple[str, ...]] = {
    "norm": ("add_rms_norm",),
    "rope": ("qk_norm_rope",),
    "prologue": ("attn_prologue",),
    "linear": ("linear",),
    "dense_mlp": ("moe_gate_up", "linear"),
    "attention": ("decode_attention",),
    "router": ("moe_router",),
    "experts": ("moe_gate_up", "moe_down"),
}
MOE_FLAGS = ("router", "experts")


def _switch(value: str | bool | int | None, name: str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value).strip().lower()
    if text not in SWITCH_VALUES:
        raise ConfigError(f"{name}={value!r}: expected 0, 1 or auto")
    return text


def _layout(value: str) -> str:
    text = value.strip().lower()
    if text not in PREFILL_LAYOUTS:
        raise ConfigError(f"QWEN3_MLX_MOE_PREFILL={value!r}: expected auto, blocked or per-pair")
    return text


@dataclass(frozen=True)
class KernelOptions:
    kernels: str = "auto"
    moe: str | None = None  # None: as `kernels`
    router: bool = True
    attention: bool = True
    moe_prefill: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "kernels", _switch(self.kernels, "kernels"))
        if self.moe is not None:
            object.__setattr__(self, "moe", _switch(self.moe, "moe"))
        if self.moe_prefill not in PREFILL_LAYOUTS:
            raise ConfigError(
                f"moe_prefill={self.moe_prefill!r}: expected auto, blocked or per-pair"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KernelOptions:
        def get(name: str, default: str | None = "auto") -> str | None:
            value = env.get(name, default)
            return None if value is None else _switch(value, name)

        return cls(
            kernels=get("QWEN3_MLX_KERNELS"),
            moe=get("QWEN3_MLX_MOE_KERNELS", None),
            router=get("QWEN3_MLX_ROUTER_KERNEL") != "0",
            attention=get("QWEN3_MLX_ATTENTION_KERNEL") != "0",
            moe_prefill=_layout(env.get("QWEN3_MLX_MOE_PREFILL", "auto")),
        )

    @classmethod
    def of(cls, value) -> KernelOptions:
        """None: the environment's; a KernelOptions; "0"/"1"/"auto"/bool: all kernels so;
        a mapping: the fields."""
        if value is None:
            return cls.from_env()
        if isinstance(value, KernelOptions):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        return cls(kernels=value)


@dataclass(frozen=True)
class KernelPlan:
    """One flag per call site; the model's layers read these on the hot path."""

    backend: str | None = None
    norm: bool = False
    rope: bool = False
    prologue: bool = False
    linear: bool = False
    dense_mlp: bool = False
    attention: bool = False
    router: bool = False
    experts: bool = False
    moe_prefill: str = "auto"  # not a kernel: the reference MoE path's layout (moe.py)

    @property
    def any(self) -> bool:
        return any(getattr(self, flag) for flag in FLAG_KERNELS)

    def kernels(self) -> list[str]:
        """The kernels this plan launches."""
        names = {k for flag, ks in FLAG_KERNELS.items() if getattr(self, flag) for k in ks}
        return sorted(names)

    def without(self, *flags: str) -> KernelPlan:
        return dataclasses.replace(self, **dict.fromkeys(flags, False))


OFF = KernelPlan()


def plan_for(options: KernelOptions | None = None, check=None) -> KernelPlan:
    """The plan for the default device. `check(backend)` → the call sites (flags) whose
    kernels passed this device's check (asked only under "auto"; kernels.check.passed)."""
    options = options or KernelOptions.from_env()
    backend = launch_backend()  # the device's, or the one `launched_by` names
    modes = {flag: options.moe or options.kernels if flag in MOE_FLAGS else options.kernels
             for flag in FLAG_KERNELS}  # fmt: skip
    if not options.router:
        modes["router"] = "0"
    if not options.attention:
        modes["attention"] = "0"
    if backend is None:
        forced = [flag for flag, mode in modes.items() if mode == "1"]
        if forced:
            raise ConfigError(
                f"fused kernels forced on, but device {mx.default_device()} has no Metal/CUDA "
                "backend"
            )
        return KernelPlan(moe_prefill=options.moe_prefill)
    passed: set[str] | None = None
    flags = {}
    for flag, mode in modes.items():
        if mode == "auto" and passed is None:
            if check is None:
                from .check import passed as check
            passed = check(backend)
        on = mode == "1" or (mode == "auto" and flag in passed)
        flags[flag] = on
    return KernelPlan(backend=backend, moe_prefill=options.moe_prefill, **flags)


def use_plan(module, plan: KernelPlan) -> None:
    """Hand `plan` to `module` and every module under it that reads one (a whole model, or a
    block built on its own)."""
    for _, child in module.named_modules():
        if hasattr(type(child), "kernel_plan"):
            object.__setattr__(child, "kernel_plan", plan)

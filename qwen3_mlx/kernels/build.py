"""The kernels' sources and their launch: one body per kernel, built for the backend in use.

Each kernel has ONE body (`kernel_sources/<name>.inc`) shared by both GPU backends; a small
per-backend prelude (`prelude.metal.h`, `prelude.cuda.h`) supplies thread indices, warp/SIMD
sums, threadgroup memory and vector loads. On Apple GPUs they load through
`mx.fast.metal_kernel`, on MLX's CUDA backend through `mx.fast.cuda_kernel`.

`launched_by` routes launches elsewhere for a while (the Metal emulation on Linux, the
self-check's launch counter): the one seam between the kernel families and MLX.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import tuning

SOURCE_DIR = Path(__file__).resolve().parent.parent / "kernel_sources"

# name -> (input names, output names); bodies are SOURCE_DIR/<name>.inc
SPECS: dict[str, tuple[list[str], list[str]]] = {
    "moe_router": (
        ["x", "w", "scales", "biases", "norm_w", "tickets"],
        ["indices", "scores", "x_norm", "logits"],
    ),
    "moe_gate_up": (["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"], ["h"]),
    "moe_down": (["h", "idx", "scores", "w", "s", "b", "res"], ["y"]),
    "qk_norm_rope": (
        ["q", "k", "v", "q_weight", "k_weight", "inv_freq", "offset"],
        ["q_out", "k_out", "v_out"],
    ),
    "add_rms_norm": (["a", "b", "weight"], ["s", "n"]),
    "linear": (["x", "w", "s", "b", "res"], ["y"]),
    "attn_prologue": (
        [
            "x", "norm_w", "w", "scales", "biases", "q_weight", "k_weight", "inv_freq",
            "offset", "tickets",
        ],
        ["q_out", "k_out", "v_out", "raw"],
    ),
    "decode_attention": (["q", "keys", "values", "starts", "tickets"], ["out", "partial", "stats"]),
}  # fmt: skip
# Kernels that read some inputs as strided views (through their shape and strides) rather
# than have MLX copy them to row-major first: the KV cache's [..., :length, :] slices.
STRIDED_INPUTS = ("decode_attention",)

# (launcher, backend name) pairs set by `launched_by`, innermost last.
_routes: list[tuple[Callable, str]] = []


def device_backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU these kernels run on, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def backend() -> str | None:
    """The backend launches go to: the device's, or the one `launched_by` names."""
    return _routes[-1][1] if _routes else device_backend()


@contextlib.contextmanager
def launched_by(launcher: Callable, backend_name: str) -> Iterator[None]:
    """Within the block, `run(name, **kwargs)` calls `launcher(name, **kwargs)` and the launch
    functions choose `backend_name`'s launch shapes."""
    _routes.append((launcher, backend_name))
    try:
        yield
    finally:
        _routes.pop()


def kernel_source(name: str, backend_name: str, comments: bool = True) -> tuple[str, str]:
    """(header, body) of kernel `name` for 'metal' or 'cuda', as handed to MLX; without
    comments and blank lines with comments=False."""
    prelude = (SOURCE_DIR / f"prelude.{backend_name}.h").read_text()
    header, prefix = prelude.split("// ---- body prefix ----\n")
    header += (SOURCE_DIR / "common.h").read_text()
    body = prefix + (SOURCE_DIR / f"{name}.inc").read_text()
    if not comments:
        return _without_comments(header), _without_comments(body)
    return header, body


def source_digest(name: str, backend_name: str) -> str:
    """What a kernel's verdict depends on: its sources for the backend and the launch shapes."""
    header, body = kernel_source(name, backend_name)
    shapes = sorted((k, repr(v)) for k, v in vars(tuning).items() if k.isupper())
    text = "\n".join([header, body, repr(SPECS[name]), repr(shapes)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without_comments(source: str) -> str:
    """`source` without // comments and blank lines (no string literal in the kernel sources
    holds a "//")."""
    return re.sub(r"\n\s*\n", "\n", re.sub(r"[ \t]*//[^\n]*", "", source))


@functools.cache
def mlx_kernel(name: str, backend_name: str):
    """The MLX custom kernel object of `name` (built once per process)."""
    inputs, outputs = SPECS[name]
    header, body = kernel_source(name, backend_name)
    make = mx.fast.metal_kernel if backend_name == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"qwen3_mlx_{name}",
        input_names=inputs,
        output_names=outputs,
        source=body,
        header=header,
        ensure_row_contiguous=name not in STRIDED_INPUTS,
    )


def mlx_launch(name: str, **kwargs):
    return mlx_kernel(name, device_backend())(**kwargs)


def run(name: str, **kwargs):
    launcher = _routes[-1][0] if _routes else mlx_launch
    return launcher(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# What the kernel families share


def affine_params(layer) -> tuple[mx.array, mx.array, mx.array, int, int] | None:
    """(weight, scales, biases, group_size, bits) of an affine-quantized layer, else None."""
    if getattr(layer, "mode", "affine") != "affine" or "scales" not in layer:
        return None
    if "biases" not in layer or "bias" in layer:
        return None
    return layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits


def quant_ok(params, in_dims: int) -> bool:
    if params is None:
        return False
    _, scales, _, group_size, bits = params
    return (
        bits in tuning.MOE_BITS
        and group_size in tuning.MOE_GROUP_SIZES
        and in_dims % group_size == 0
        and scales.dtype in tuning.FLOAT_TYPES
    )


def split_count(limit: int, fits) -> int:
    """Threadgroups (8, 4, 2 or 1, at most `limit`, `fits(n)`) a split kernel spreads one
    token's or head's work over; 1 on backends without the cross-threadgroup hand-off."""
    most = limit if backend() in tuning.SPLIT_BACKENDS else 1
    return next(n for n in (8, 4, 2, 1) if n <= most and fits(n))


def tickets(owner, site: str = "") -> mx.array:
    """Arrival counters of a split kernel's call site (`owner`: the layer it serves; `site`
    tells apart the kernels of one layer).

    A split kernel's threadgroups take tickets from these counters in device memory, so
    each call site needs its own set: launches that share counters must run one after the
    other, which a layer's launches do (each depends on the previous layer's output).
    Made outside any compile trace (`prepare`).
    """
    attr = f"_tickets{site}"
    counters = owner.__dict__.get(attr)
    if counters is None:
        counters = mx.zeros((tuning.TICKETS,), mx.uint32)  # made on the device: device memory
        mx.eval(counters)
        object.__setattr__(owner, attr, counters)
    return counters


@functools.cache
def dummy(dtype) -> mx.array:
    """A placeholder for an unused kernel input (never read)."""
    array = mx.zeros((8,), dtype)
    mx.eval(array)
    return array


@functools.cache
def float_bits(value: float) -> int:
    """A float32's bits as a template constant (kernels read it back with AS_FLOAT).

    Norm epsilons are baked into the kernels rather than passed as arrays: MLX keeps arrays
    of 8 bytes or less in host-side unified memory, and every GPU read of one crosses the
    host link (run R/S on the H200: the kernels reading one waited on it for most of
    their time)."""
    return int(np.array(value, np.float32).view(np.int32))

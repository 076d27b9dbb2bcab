"""Run the Metal build of qwen3_mlx's kernels on the CPU (no Mac needed).

`metal_source` writes the kernel source exactly as MLX's `mx.fast.metal_kernel` does
(mlx/backend/common/metal_kernel.cpp, `metal_kernel` + `write_signature`, as of
ml-explore/mlx 846d176): header, `template <...>`, `[[kernel]] void custom_kernel_<name>_...(`
inputs (`const device T*`, or `const constant T*` below 8 elements), their `_shape` /
`_strides` / `_ndim` where the body names them, outputs (`device T*`), the thread-position
attributes the body names, then the body, and the explicit `[[host_name]]` instantiation.

`emulated_source` turns that into C++ for clang++ with metal_shim.h: the `[[...]]`
attributes stay (clang ignores unknown attributes, -Wno-unknown-attributes), the host_name
instantiation (no valid C++: an attribute list cannot appear there) is left out, the
threadgroup arrays declared in the body become `static` (one copy shared by the threads of
the running threadgroup; threadgroups run one at a time), and an `emu_entry` calls the
kernel for one thread. `check_strict` compiles it with clang address spaces (-fsyntax-only);
`run` links it with runtime.cpp and runs it on one OS thread per GPU thread.

An `Emulator` is a launcher: under `qwen3_mlx.kernels.launched_by(emulator, "metal")` the
launch functions of qwen3_mlx.kernels run the Metal sources here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen3_mlx.kernels import build as kernel_build

HERE = Path(__file__).resolve().parent
CACHE = Path(
    os.environ.get("QWEN3_MLX_METAL_EMU_CACHE", Path(tempfile.gettempdir()) / "qwen3_mlx_metal_emu")
)
CXX = os.environ.get("CXX_EMU", "clang++")
CXXFLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-Wno-unknown-attributes", "-w"]

# MLX: inputs with fewer elements are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8
# MLX's list, in its order: (attribute, type); added where the body names it.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
TYPE_STRINGS = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}
RAW = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


class EmulationError(RuntimeError):
    """The emulated kernel did not compile or did not run to the end."""


@dataclass
class InputInfo:
    dtype: mx.Dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    data: bytes  # from the first element the view reaches to the last

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _row_major(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def input_info(a: mx.array, row_contiguous: bool) -> InputInfo:
    """An input as the kernel sees it: row-major (MLX copies it so when the kernel asks for
    row-contiguous inputs), else the array's own strides over its buffer."""
    raw = a.view(RAW[a.dtype.size]) if a.dtype.size in RAW else a
    mx.eval(raw)
    if row_contiguous or a.ndim == 0:
        data = np.ascontiguousarray(np.array(raw)).tobytes()
        return InputInfo(a.dtype, tuple(a.shape), _row_major(a.shape), data)
    view = np.asarray(memoryview(raw))
    item = view.itemsize
    if any(s < 0 for s in view.strides):
        raise EmulationError("negative strides")
    strides = tuple(s // item for s in view.strides)
    extent = sum((n - 1) * s for n, s in zip(view.shape, strides, strict=True)) + 1
    flat = np.lib.stride_tricks.as_strided(view, shape=(extent,), strides=(item,))
    return InputInfo(a.dtype, tuple(a.shape), strides, flat.tobytes())


def _template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # std::ostream << bool
    if isinstance(value, int):
        return str(value)
    return TYPE_STRINGS[value]


def kernel_name(name: str, template, inputs: list[InputInfo], output_dtypes) -> str:
    """MLX's `custom_kernel_<name>_<template hash>_<input types>_<output types>`."""
    out = "custom_kernel_" + name
    if template:
        out += "_" + "_".join(_template_value(v) for _, v in template)
    for info in inputs:
        out += "_" + TYPE_STRINGS[info.dtype]
        if info.ndim == 0:
            out += "s"
        elif info.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dtype in output_dtypes:
        out += "_" + TYPE_STRINGS[dtype]
    return out


def shape_infos(body: str, input_names) -> list[tuple[bool, bool, bool]]:
    return [
        (f"{n}_shape" in body, f"{n}_strides" in body, f"{n}_ndim" in body) for n in input_names
    ]


def attributes(body: str) -> list[tuple[str, str]]:
    return [(attr, typ) for attr, typ in METAL_ATTRIBUTES if attr in body]


def metal_source(
    name, header, body, input_names, inputs, output_names, output_dtypes, template
) -> tuple[str, str, list[tuple[str, str]]]:
    """(MLX's full kernel source, its kernel name, the buffer list [(role, arg name)])."""
    func = kernel_name(name, template, inputs, output_dtypes)
    infos = shape_infos(body, input_names)
    attrs = attributes(body)
    src = header
    if template:
        kinds = []
        for key, value in template:
            kind = (
                "bool"
                if isinstance(value, bool)
                else "int"
                if isinstance(value, int)
                else "typename"
            )
            kinds.append(f"{kind} {key}")
        src += "template <" + ", ".join(kinds) + ">\n"
    src += f"[[kernel]] void {func}(\n"
    index = 0
    buffers = []
    for n, info, (has_shape, has_strides, has_ndim) in zip(input_names, inputs, infos, strict=True):
        location = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if info.ndim == 0 else "*"
        src += f"  const {location} {TYPE_STRINGS[info.dtype]}{ref} {n} [[buffer({index})]],\n"
        buffers.append(("input" if ref == "*" else "scalar", n))
        index += 1
        if info.ndim > 0:
            if has_shape:
                src += f"  const constant int* {n}_shape [[buffer({index})]],\n"
                buffers.append(("shape", n))
                index += 1
            if has_strides:
                src += f"  const constant int64_t* {n}_strides [[buffer({index})]],\n"
                buffers.append(("strides", n))
                index += 1
            if has_ndim:
                src += f"  const constant int& {n}_ndim [[buffer({index})]],\n"
                buffers.append(("ndim", n))
                index += 1
    for n, dtype in zip(output_names, output_dtypes, strict=True):
        src += f"  device {TYPE_STRINGS[dtype]}* {n} [[buffer({index})]]"
        # MLX compares the running buffer index with inputs + outputs (not counting the
        # shape buffers), so it can close the list early; reproduced as written.
        if index < len(inputs) + len(output_names) - 1 or attrs:
            src += ",\n"
        else:
            src += ") {\n"
        buffers.append(("output", n))
        index += 1
    for i, (attr, typ) in enumerate(attrs):
        src += f"  {typ} {attr} [[{attr}]]"
        src += ",\n" if i < len(attrs) - 1 else ") {\n"
    src += body + "\n}\n"
    if template:
        definition = func + "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        src += (
            f'\ntemplate [[host_name("{func}")]] [[kernel]] decltype({definition}) {definition};\n'
        )
    return src, func, buffers


_SHARED_DECL = re.compile(r"^(\s*)(SHARED|threadgroup)(\s)", re.M)
_STATIC_SHARED = re.compile(
    r"^\s*static (?:SHARED|threadgroup)\s+[\w:<>, ]+?\s+(?P<name>\w+)\s*(?:\[[^;]*\])?\s*;", re.M
)


def emulated_source(
    mlx_src: str, body: str, func: str, template, inputs, output_dtypes, buffers
) -> str:
    """C++ for clang++: metal_shim.h + MLX's source (see the module docstring) + emu_entry."""
    src = mlx_src
    new_body = _SHARED_DECL.sub(r"\1static \2\3", body)
    # ... and each registers itself, to be filled with garbage between threadgroups
    new_body = _STATIC_SHARED.sub(
        r"\g<0> emu_register_shared((uintptr_t)&\g<name>, sizeof(\g<name>));", new_body
    )
    if body not in src:
        raise EmulationError("body not found in source")
    src = src.replace(body, new_body)
    src = re.sub(r"\ntemplate \[\[host_name\(.*\n", "\n", src)
    targs = "<" + ", ".join(_template_value(v) for _, v in template) + ">" if template else ""
    args = []
    names = [n for role, n in buffers if role in ("input", "scalar")]
    infos = dict(zip(names, inputs, strict=True))
    out_types = iter(output_dtypes)
    for i, (role, n) in enumerate(buffers):
        if role in ("input", "scalar"):
            info = infos[n]
            loc = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            typ = TYPE_STRINGS[info.dtype]
            cast = f"(const {loc} {typ}*)(uintptr_t)b[{i}]"
            args.append(cast if role == "input" else "*" + cast)
        elif role == "shape":
            args.append(f"(const constant int*)(uintptr_t)b[{i}]")
        elif role == "strides":
            args.append(f"(const constant int64_t*)(uintptr_t)b[{i}]")
        elif role == "ndim":
            args.append(f"*(const constant int*)(uintptr_t)b[{i}]")
        else:
            args.append(f"(device {TYPE_STRINGS[next(out_types)]}*)(uintptr_t)b[{i}]")
    for attr, typ in attributes(body):
        if typ == "uint3":
            args.append(f"uint3{{a->{attr}[0], a->{attr}[1], a->{attr}[2]}}")
        else:
            args.append(f"a->{attr}")
    entry = (
        '\nextern "C" void emu_entry(void* const* b, const EmuAttrs* a) {\n  '
        + func
        + targs
        + "(\n      "
        + ",\n      ".join(args)
        + ");\n}\n"
    )
    return '#include "metal_shim.h"\n' + src + entry


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _shim_text() -> str:
    return "".join((HERE / f).read_text() for f in ("metal_shim.h", "emu_api.h", "runtime.cpp"))


def clang_available() -> bool:
    return shutil.which(CXX) is not None


_lock = threading.Lock()


def _compile(args: list[str], what: str) -> None:
    proc = subprocess.run([CXX, *CXXFLAGS, "-I", str(HERE), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationError(f"{what} failed to compile:\n{proc.stderr[-6000:]}")


def _runtime_object() -> Path:
    out = CACHE / f"runtime-{_digest(_shim_text(), ' '.join(CXXFLAGS))}.o"
    with _lock:
        if not out.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp.o")
            _compile(["-c", str(HERE / "runtime.cpp"), "-o", str(tmp)], "runtime.cpp")
            tmp.replace(out)
    return out


def build(source: str) -> Path:
    """The executable for one emulated kernel source (cached by its hash)."""
    key = _digest(source, _shim_text(), " ".join(CXXFLAGS))
    exe = CACHE / key / "kernel"
    if exe.exists():
        return exe
    runtime = _runtime_object()
    exe.parent.mkdir(parents=True, exist_ok=True)
    cpp = exe.parent / "kernel.cpp"
    cpp.write_text(source)
    tmp = exe.with_suffix(f".{os.getpid()}.tmp")
    _compile([str(cpp), str(runtime), "-pthread", "-o", str(tmp)], str(cpp))
    tmp.replace(exe)
    return exe


def check_strict(source: str) -> None:
    """Compile with Metal's address spaces as clang address spaces (syntax and types only)."""
    key = _digest("strict", source, _shim_text())
    stamp = CACHE / "strict" / key
    if stamp.exists():
        return
    stamp.parent.mkdir(parents=True, exist_ok=True)
    cpp = stamp.with_suffix(".cpp")
    cpp.write_text(source)
    _compile(["-DEMU_STRICT", "-fsyntax-only", str(cpp)], f"{cpp} (strict address spaces)")
    stamp.touch()


@dataclass
class Launch:
    name: str
    source: str  # the emulated C++
    mlx_source: str  # as MLX would hand it to the Metal compiler
    buffers: list[tuple[str, str]]
    data: list[bytes | None]
    outputs: list[tuple[tuple[int, ...], mx.Dtype]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]


def prepare(
    name, inputs, template, grid, threadgroup, output_shapes, output_dtypes, prelude=None
) -> Launch:
    """The launch `build.run(name, ...)` would make, as source + buffers."""
    header, body = kernel_build.kernel_source(name, "metal")
    if prelude is not None:  # a replacement prelude.metal.h text (the deliberate-break test)
        head, prefix = prelude.split("// ---- body prefix ----\n")
        header = head + (kernel_build.SOURCE_DIR / "common.h").read_text()
        body = prefix + (kernel_build.SOURCE_DIR / f"{name}.inc").read_text()
    input_names, output_names = kernel_build.SPECS[name]
    row_contiguous = name not in kernel_build.STRIDED_INPUTS
    infos = [input_info(a, row_contiguous) for a in inputs]
    mlx_src, func, buffers = metal_source(
        f"qwen3_mlx_{name}", header, body, input_names, infos, output_names, output_dtypes, template
    )
    source = emulated_source(mlx_src, body, func, template, infos, output_dtypes, buffers)
    by_name = dict(zip(input_names, infos, strict=True))
    data: list[bytes | None] = []
    for role, n in buffers:
        if role in ("input", "scalar"):
            data.append(by_name[n].data)
        elif role == "shape":
            data.append(np.array(by_name[n].shape, np.int32).tobytes())
        elif role == "strides":
            data.append(np.array(by_name[n].strides, np.int64).tobytes())
        elif role == "ndim":
            data.append(np.array(by_name[n].ndim, np.int32).tobytes())
        else:
            data.append(None)
    outputs = [(tuple(s), d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
    return Launch(name, source, mlx_src, buffers, data, outputs, tuple(grid), tuple(threadgroup))


def strict_variant(launch_args: dict) -> str:
    """The launch's source with bfloat16 taken as float16 (bfloat16_t is a class here, and
    C++ has no member functions for objects in other address spaces)."""
    args = dict(launch_args)
    args["template"] = [
        (k, mx.float16 if isinstance(v, mx.Dtype) and v == mx.bfloat16 else v)
        for k, v in args["template"]
    ]
    args["inputs"] = [a.astype(mx.float16) if a.dtype == mx.bfloat16 else a for a in args["inputs"]]
    args["output_dtypes"] = [mx.float16 if d == mx.bfloat16 else d for d in args["output_dtypes"]]
    return prepare(**args).source


def execute(launch: Launch, seed: int = 0, timeout: int = 120) -> list[bytes]:
    """Run a prepared launch; returns every buffer's bytes afterwards (inputs included: the
    ticket counters are written through atomics)."""
    exe = build(launch.source)
    gx, gy, gz = launch.grid
    tx, ty, tz = (min(t, g) for t, g in zip(launch.threadgroup, launch.grid, strict=True))
    with tempfile.TemporaryDirectory(prefix="emu-run-") as tmp:
        lines = [
            f"grid {gx} {gy} {gz}",
            f"group {tx} {ty} {tz}",
            f"seed {seed}",
            f"timeout {timeout}",
        ]
        out_iter = iter(launch.outputs)
        for i, ((role, _), blob) in enumerate(zip(launch.buffers, launch.data, strict=True)):
            if role == "output":
                shape, dtype = next(out_iter)
                nbytes = int(np.prod(shape)) * dtype.size
                src = "-"
            else:
                nbytes = len(blob)
                src = os.path.join(tmp, f"in{i}")
                Path(src).write_bytes(blob)
            lines.append(f"buffer {nbytes} {src} {os.path.join(tmp, f'out{i}')}")
        manifest = os.path.join(tmp, "manifest")
        Path(manifest).write_text("\n".join(lines) + "\n")
        try:
            proc = subprocess.run(
                [str(exe), manifest], capture_output=True, text=True, timeout=timeout + 30
            )
        except subprocess.TimeoutExpired as e:
            raise EmulationError(f"{launch.name}: timed out (deadlock?)") from e
        if proc.returncode != 0:
            raise EmulationError(f"{launch.name}: exit {proc.returncode}: {proc.stderr[-3000:]}")
        return [Path(os.path.join(tmp, f"out{i}")).read_bytes() for i in range(len(launch.buffers))]


def to_array(blob: bytes, shape, dtype) -> mx.array:
    raw = np.frombuffer(blob, dtype=np.dtype(f"u{dtype.size}")).reshape(shape)
    return mx.array(raw).view(dtype) if dtype.size > 0 else mx.array(raw)


_strict_checked: set = set()


class Emulator:
    """A launcher (see `qwen3_mlx.kernels.launched_by`); records every launch (and the buffers
    after it)."""

    def __init__(self, seed: int = 0, prelude: str | None = None, strict: bool = True):
        self.seed = seed
        self.prelude = prelude
        self.strict = strict
        self.launches: list[tuple[Launch, list[bytes]]] = []

    def __call__(self, name, **kwargs):
        args = dict(name=name, prelude=self.prelude, **kwargs)
        args.pop("init_value", None)
        launch = prepare(**args)
        # once per kernel, input types and address spaces (`constant` below 8 elements)
        key = (
            name,
            tuple((str(a.dtype), a.size < MAX_CONSTANT_ARRAY_SIZE) for a in kwargs["inputs"]),
        )
        if self.strict and key not in _strict_checked:
            check_strict(strict_variant(args))
            _strict_checked.add(key)
        blobs = execute(launch, seed=self.seed)
        self.launches.append((launch, blobs))
        outs = []
        for (role, _), blob in zip(launch.buffers, blobs, strict=True):
            if role == "output":
                shape, dtype = launch.outputs[len(outs)]
                outs.append(to_array(blob, shape, dtype))
        return outs

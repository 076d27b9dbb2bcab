"""Each fused kernel proves itself on this device before a model runs it.

Under the "auto" switch a call site's kernels run only once they have passed a check here: a
small random Qwen3 (a dense layer and an MoE layer, 4-bit weights, an 8-bit router, bfloat16)
decodes one and then three rows with that call site's kernels on, next to the reference ops
from the same cache; the logits must agree (relative error under TOLERANCE) and the kernels
must have launched. A kernel that fails to compile, crashes or disagrees stays off, with one
warning line naming it; the model then runs the reference ops, never a wrong token.

At the model's own shapes, `keep_faster` then times one decode step with each call site's
kernels against without them, once per model shape, and turns off a call site whose kernels
are slower there: a correct but slower kernel on some GPU never makes a user slower.

Verdicts are kept on disk (`cache_file()`: the user cache dir, or $QWEN3_MLX_CACHE), keyed by
backend, GPU name, MLX version and a digest of the kernels' sources and launch shapes, so a
new MLX, GPU or kernel source is checked again and everything else is not.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import build, tuning
from .options import FLAG_KERNELS, KernelPlan

log = logging.getLogger("qwen3_mlx.kernels")

CHECK_VERSION = 3  # bump when what a check does changes: every verdict is redone
# ||kernel - reference|| / ||reference|| of the logits. In float32 a kernel agrees to ~1e-6; in
# bfloat16 rounding alone reaches ~5% on the check's random model, a broken kernel ~100%.
TOLERANCE = {mx.float32: 1e-3, mx.bfloat16: 0.15}

# Call sites whose kernels wait on other threadgroups (split-K over the cache): Metal does not
# promise the forward progress that needs, so there they stay off (see docs/kernels.md).
NEEDS_SPLIT = ("attention",)

CHECK_CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 512,
    "intermediate_size": 512,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "mlp_only_layers": [0],
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
}


@dataclass
class Verdict:
    flag: str  # the call site (KernelPlan field)
    kernels: list[str]
    backend: str
    device: str
    passed: bool
    launched: bool  # compiled and ran
    max_error: float | None  # relative, in float32
    max_error_bf16: float | None = None
    note: str = ""
    seconds: float = 0.0


def cache_file() -> Path:
    root = os.environ.get("QWEN3_MLX_CACHE")
    if root:
        return Path(root).expanduser() / "kernels.json"
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3-mlx" / "kernels.json"


def device_name(backend: str) -> str:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return str(info.get("device_name") or info.get("name") or backend)
    except Exception:
        return backend


def verdict_key(flag: str, backend: str, device: str) -> str:
    digests = ",".join(build.source_digest(k, backend) for k in FLAG_KERNELS[flag])
    return f"{backend}|{device}|mlx {mx.__version__}|v{CHECK_VERSION}|{flag}|{digests}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: check again


def _write(path: Path, verdicts: dict) -> None:
    """Atomically (a reader never sees half a file); a cache that can't be written only costs
    the next load a check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(verdicts, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("kernel verdicts not saved to %s: %s", path, e)


_passed: dict[tuple, set[str]] = {}  # per process: (backend, device, cache file) -> flags


def passed(backend: str) -> set[str]:
    """The call sites (KernelPlan flags) whose kernels passed on this device."""
    key = (backend, device_name(backend), cache_file())
    if key not in _passed:
        _passed[key] = {v.flag for v in verdicts(backend) if v.passed}
    return _passed[key]


def verdicts(backend: str, recheck: bool = False, flags=None) -> list[Verdict]:
    """Every call site's verdict on this device: from the cache, else checked now (and saved)."""
    path, device = cache_file(), device_name(backend)
    stored = _read(path)
    todo, found = [], {}
    for flag in flags or FLAG_KERNELS:
        key = verdict_key(flag, backend, device)
        entry = stored.get(key)
        if entry is not None and not recheck:
            try:
                found[flag] = Verdict(**entry)
                continue
            except TypeError:
                pass  # an entry of another layout: check again
        todo.append((flag, key))
    if todo:
        started = time.perf_counter()
        models = [check_model(dtype) for dtype in TOLERANCE]
        for flag, key in todo:
            verdict = check(models, flag, backend, device)
            found[flag] = verdict
            stored[key] = asdict(verdict)
            if not verdict.passed and verdict.note != _NOT_HERE:
                log.warning(
                    "qwen3-mlx: fused kernel %s failed its check on %s (%s); using the "
                    "reference ops",
                    "+".join(verdict.kernels),
                    device,
                    verdict.note,
                )
        _write(path, stored)
        _passed.pop((backend, device, path), None)
        log.info("kernel check: %d call sites in %.1f s", len(todo), time.perf_counter() - started)
    return [found[f] for f in flags or FLAG_KERNELS]


_NOT_HERE = "not used on this backend"


def check_model(dtype=mx.float32):
    """The small random model every check decodes with (4-bit, 8-bit router), per dtype."""
    from ..config import ModelArgs
    from ..model import Model

    model = Model(ModelArgs.from_dict(CHECK_CONFIG, "kernel check"), kernels=KernelPlan())
    model.set_dtype(dtype)
    recipe = model.quant_predicate  # as the converter's default: 4 bits, the router at 8
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda path, m: hasattr(m, "to_quantized") and recipe(path, m),
    )
    mx.eval(model.parameters())
    return model


def _decode_logits(
    model, plan: KernelPlan, prompt: mx.array, token: mx.array, compile: str | bool = False
) -> mx.array:
    """Prefill `prompt` on the reference ops, then decode `token` with `plan` (`compile`: the
    decode step's compile switch)."""
    from mlx_lm.models.cache import KVCache

    model.use_kernels(KernelPlan(backend=plan.backend), compile=False)
    cache = [KVCache() for _ in model.layers]
    mx.eval(model(prompt, cache=cache), [c.state for c in cache])
    model.use_kernels(plan, compile=compile)
    logits = model(token, cache=cache).astype(mx.float32)
    mx.eval(logits)
    return logits


def check(models, flag: str, backend: str, device: str) -> Verdict:
    """Decode with call site `flag`'s kernels on and off, in each check model (float32: a
    tight bound; bfloat16: the conversions); compare the logits."""
    names = list(FLAG_KERNELS[flag])
    verdict = Verdict(flag, names, backend, device, False, False, None)
    if flag in NEEDS_SPLIT and backend not in tuning.SPLIT_BACKENDS:
        verdict.note = _NOT_HERE
        return verdict
    started = time.perf_counter()
    # Decode attention covers caches of ATTENTION_MIN_KEYS keys and more, and runs only in the
    # per-layer compiled step (between its compiled functions); the other call sites are checked
    # uncompiled, which is also how launched_by's emulated launches can run.
    length = tuning.ATTENTION_MIN_KEYS + 8 if flag == "attention" else 12
    decode_compile = "layer" if flag == "attention" else False
    errors, launches = [], Counter()
    outer = build._routes[-1] if build._routes else (build.mlx_launch, backend)

    def counted(name, **kwargs):
        launches[name] += 1
        return outer[0](name, **kwargs)

    try:
        for model in models:
            dtype = model.model.norm.weight.dtype
            for rows in (1, 3):  # one token per launch, and a batch (other launch shapes)
                prompt = mx.random.randint(0, CHECK_CONFIG["vocab_size"], (rows, length))
                token = mx.random.randint(0, CHECK_CONFIG["vocab_size"], (rows, 1))
                reference = _decode_logits(
                    model, KernelPlan(backend=backend), prompt, token, decode_compile
                )
                with build.launched_by(counted, backend):
                    plan = KernelPlan(backend=backend, **{flag: True})
                    fused = _decode_logits(model, plan, prompt, token, decode_compile)
                scale = float(mx.linalg.norm(reference).item()) or 1.0
                error = float(mx.linalg.norm(fused - reference).item()) / scale
                errors.append((dtype, error))
                if not error <= TOLERANCE[dtype]:  # NaN fails too
                    verdict.note = f"relative error {error:.3g} > {TOLERANCE[dtype]} in {dtype}"
            if flag == "attention":  # the server's batch: left-padded rows, any length
                with build.launched_by(counted, backend):
                    error = _row_starts_error(dtype)
                errors.append((dtype, error))
                if not error <= ROW_STARTS_TOLERANCE[dtype]:
                    verdict.note = f"left-padded rows: relative error {error:.3g} in {dtype}"
    except Exception as e:  # a kernel that does not compile or crashes: off, never fatal
        verdict.note = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        verdict.seconds = time.perf_counter() - started
        return verdict
    finally:
        for model in models:
            model.use_kernels(KernelPlan())
    verdict.seconds = time.perf_counter() - started
    verdict.launched = all(launches[n] for n in names)
    verdict.max_error = max(e for d, e in errors if d == mx.float32)
    verdict.max_error_bf16 = max(e for d, e in errors if d == mx.bfloat16)
    if not verdict.launched:
        verdict.note = "not launched at the check's shapes"
    elif not verdict.note:
        verdict.passed = True
    return verdict


# The attention output itself (no model around it): bfloat16 inputs, float32 accumulation.
ROW_STARTS_TOLERANCE = {mx.float32: 1e-4, mx.bfloat16: 2e-2}


def _row_starts_error(dtype) -> float:
    """Decode attention over rows that start at different columns (`starts`), against MLX's
    attention with the equivalent mask; ||kernel - reference|| / ||reference||."""
    from .attention import decode_attention

    batch, heads, kv_heads, length, head_dim = 3, 8, 2, 70, 128
    q = mx.random.normal((batch, heads, 1, head_dim)).astype(dtype)
    keys = mx.random.normal((batch, kv_heads, length, head_dim)).astype(dtype)
    values = mx.random.normal((batch, kv_heads, length, head_dim)).astype(dtype)
    starts = mx.array([0, 37, length - 1], dtype=mx.int32)  # all, some, only its own key
    mask = (mx.arange(length)[None, :] >= starts[:, None])[:, None, None, :]
    scale = head_dim**-0.5

    class Site:  # the call site's arrival counters live here
        pass

    out = decode_attention(q, keys, values, scale, Site(), starts).astype(mx.float32)
    f32 = [a.astype(mx.float32) for a in (q, keys, values)]
    reference = mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)
    return float((mx.linalg.norm(out - reference) / mx.linalg.norm(reference)).item())


# A call site stays on unless its kernels make the step slower by more than the timing noise.
SLOWER = 1.02


def step_seconds(model, plan: KernelPlan, steps: int = 8) -> float:
    """One decode step's time (batch 1, a short cache, the model's own compiled path)."""
    from mlx_lm.models.cache import KVCache

    model.use_kernels(plan)
    cache = [KVCache() for _ in model.layers]
    mx.eval(model(mx.zeros((1, 16), mx.int32), cache=cache))
    token = mx.zeros((1, 1), mx.int32)
    for _ in range(3):  # compile and warm up
        mx.eval(model(token, cache=cache))
    started = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return (time.perf_counter() - started) / steps


def _shape_key(model, plan: KernelPlan) -> str:
    args, layer = model.args, model.layers[-1]
    quant = (
        getattr(layer.self_attn.q_proj, "bits", None),
        getattr(layer.self_attn.q_proj, "group_size", None),
    )
    shape = (
        args.hidden_size, args.num_hidden_layers, args.num_attention_heads,
        args.num_key_value_heads, args.head_dim, args.num_experts, args.num_experts_per_tok,
        args.intermediate_size, args.moe_intermediate_size, args.vocab_size, quant,
        str(model.model.norm.weight.dtype),
    )  # fmt: skip
    digests = ",".join(build.source_digest(k, plan.backend) for k in plan.kernels())
    return f"{repr(shape)}|{digests}"


def time_call_sites(model, plan: KernelPlan) -> dict[str, float]:
    """Per call site on in `plan`: step time with its kernels / without them."""
    base = step_seconds(model, plan)
    flags = [f for f in FLAG_KERNELS if getattr(plan, f)]
    return {f: base / step_seconds(model, plan.without(f)) for f in flags}


def keep_faster(model, plan: KernelPlan) -> KernelPlan:
    """`plan` without the call sites whose kernels are slower at this model's shapes (timed
    once per device, MLX version, model shape and kernel sources; kept with the verdicts)."""
    if not plan.any or plan.backend is None:
        return plan
    path, device = cache_file(), device_name(plan.backend)
    key = f"{plan.backend}|{device}|mlx {mx.__version__}|timing|{_shape_key(model, plan)}"
    stored = _read(path)
    ratios = stored.get(key)
    if not isinstance(ratios, dict):
        started = time.perf_counter()
        ratios = time_call_sites(model, plan)
        stored[key] = ratios
        _write(path, stored)
        log.info("kernel timing at the model's shapes: %.1f s", time.perf_counter() - started)
    slower = [f for f, r in ratios.items() if getattr(plan, f, False) and not r <= SLOWER]
    for flag in slower:
        log.warning(
            "qwen3-mlx: fused kernel %s is slower than the reference ops at this model's "
            "shapes (%.2fx); using the reference ops",
            "+".join(FLAG_KERNELS[flag]),
            ratios[flag],
        )
    return plan.without(*slower)

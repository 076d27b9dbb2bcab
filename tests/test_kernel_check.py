"""Each fused kernel's check on the device (qwen3_mlx.kernels.check), run here on the Metal
sources through the emulator (tests/metal_emulation/): a kernel that passes is cached and not
checked again; a changed source is checked again; a broken kernel stays off with one warning,
and the model's output is the reference output."""

from __future__ import annotations

import json
import logging
import shutil

import mlx.core as mx
import pytest

from qwen3_mlx import kernels
from qwen3_mlx.config import ModelArgs
from qwen3_mlx.kernels import KernelOptions, KernelPlan, build, check
from qwen3_mlx.kernels.__main__ import main as kernels_main
from qwen3_mlx.kernels.options import FLAG_KERNELS
from qwen3_mlx.model import Model
from tests.metal_emulation import emulate

pytestmark = pytest.mark.skipif(
    not emulate.clang_available(), reason="clang++ not installed (apt-get install clang)"
)


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A copy of the kernel sources (to break one), and an empty verdict cache."""
    copy = tmp_path / "kernel_sources"
    shutil.copytree(build.SOURCE_DIR, copy)
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    monkeypatch.setenv("QWEN3_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(check, "_passed", {})
    return copy


def break_norm(sources) -> None:
    """add_rms_norm scales by rms instead of 1/rms: it still compiles and runs."""
    path = sources / "add_rms_norm.inc"
    text = path.read_text()
    assert "rsqrt(total" in text
    path.write_text(text.replace("rsqrt(total", "sqrt(total"))


def emulated(launches: list[str]):
    emulator = emulate.Emulator(seed=7)

    def launch(name, **kwargs):
        launches.append(name)
        return emulator(name, **kwargs)

    return kernels.launched_by(launch, "metal")


def test_verdicts_are_cached_and_redone_when_the_source_changes(sources, caplog):
    launches: list[str] = []
    with emulated(launches):
        (first,) = check.verdicts("metal", flags=["norm"])
    assert first.passed and first.launched and first.max_error < 1e-5, first
    assert launches.count("add_rms_norm") >= 4  # two check models, one and three rows
    stored = json.loads(check.cache_file().read_text())
    assert [v["flag"] for v in stored.values()] == ["norm"]

    launches.clear()
    with emulated(launches):
        (again,) = check.verdicts("metal", flags=["norm"])
    assert again == first and launches == []  # read back, not checked again

    break_norm(sources)
    with caplog.at_level(logging.WARNING, logger="qwen3_mlx.kernels"):
        with emulated(launches):
            (broken,) = check.verdicts("metal", flags=["norm"])
    assert launches, "a changed source must be checked again"
    assert not broken.passed and broken.launched and "relative error" in broken.note
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "add_rms_norm" in warnings[0], warnings
    assert len(json.loads(check.cache_file().read_text())) == 2  # both sources' verdicts


def test_a_broken_kernel_falls_back_to_the_reference_output(sources, capsys):
    break_norm(sources)
    model = Model(ModelArgs.from_dict(check.CHECK_CONFIG), kernels=KernelPlan())
    mx.eval(model.parameters())
    prompt = mx.array([[1, 2, 3, 4, 5]])
    reference = model(prompt)  # prefill: no kernel covers it; decode below
    launches: list[str] = []
    with emulated(launches):
        plan = model.use_kernels(KernelOptions(kernels="auto"))
        assert plan.backend == "metal" and not plan.norm, plan  # broken: kept off
        assert plan.rope and plan.experts  # the others passed (checked alongside)
        auto = decode_logits(model, prompt)
        model.use_kernels(KernelPlan(backend="metal", norm=True))  # forced on regardless
        forced = decode_logits(model, prompt)
        kernels_main([])  # the verdicts just made, as `qwen3-mlx kernels` prints them
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(table) == set(FLAG_KERNELS), table
    assert " off " in table["norm"] and "relative error" in table["norm"]
    assert " on " in table["rope"] and "not used on this backend" in table["attention"]
    model.use_kernels(KernelPlan())
    plain = decode_logits(model, prompt)
    assert reference.shape[-1] == plain.shape[-1]
    assert mx.array_equal(plain.argmax(-1), auto.argmax(-1))
    assert float(mx.abs(auto - plain).max()) < 1e-3 * float(mx.abs(plain).max())
    # The check is what kept it off: the broken kernel itself changes the logits.
    assert float(mx.abs(forced - plain).max()) > 0.1 * float(mx.abs(plain).max())


def decode_logits(model, prompt) -> mx.array:
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    model(prompt, cache=cache)
    logits = model(mx.array([[7]]), cache=cache)[0, -1]
    mx.eval(logits)
    return logits


def test_a_slower_kernel_is_kept_off_at_the_model_s_shapes(sources, caplog):
    """The emulated kernel is far slower than MLX's own ops here: timed at the model's
    shapes, it goes off (and the timing is cached: no launch the second time)."""
    model = Model(ModelArgs.from_dict(check.CHECK_CONFIG), kernels=KernelPlan())
    model.use_kernels(KernelPlan(), compile=False)  # eager: the emulator can't be compiled
    mx.eval(model.parameters())
    plan = KernelPlan(backend="metal", norm=True)
    launches: list[str] = []
    with caplog.at_level(logging.WARNING, logger="qwen3_mlx.kernels"), emulated(launches):
        kept = check.keep_faster(model, plan)
        assert launches and not kept.norm and kept.backend == "metal"
        launches.clear()
        assert check.keep_faster(model, plan) == kept and launches == []
    slower = [r.getMessage() for r in caplog.records if "slower" in r.getMessage()]
    assert len(slower) == 2 and "add_rms_norm" in slower[0]  # said at each load
    assert check.keep_faster(model, KernelPlan()) == KernelPlan()  # nothing on: no timing

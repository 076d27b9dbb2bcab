"""MLX's quantization modes in the converter (`--q-mode affine|mxfp4|nvfp4|mxfp8`) and
`--dequantize`, on tiny random dense and MoE checkpoints (CPU, CI):

- each mode: our conversion equals mlx-lm's (config, tensors bit for bit), and each project
  loads both with the same logits; the router stays 8-bit affine;
- the loader reads a float-mode checkpoint whose config names no module (shapes tell);
- --dequantize of ours and of mlx-lm's, every mode: float logits equal the quantized ones,
  tensors equal mlx-lm's own --dequantize, parts of a module spread over shards;
- the fused kernels decline float-mode layers (the reference path runs), the affine router
  keeps its kernel; the CPU's dense output head and compiled decode step cover the float
  modes; the server's KV slots take the model's K/V dtype;
- bad flags: one line, exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from qwen3_mlx import kernels, quant
from qwen3_mlx.convert import convert, main
from qwen3_mlx.errors import ConfigError
from qwen3_mlx.kernels import KernelPlan
from qwen3_mlx.loading import load_model, prepare_for_inference
from qwen3_mlx.weights import INDEX_FILE
from tests.checkpoints import make_checkpoint, write_tokenizer
from tests.metal_emulation import emulate

MODES = ["affine", "mxfp4", "nvfp4", "mxfp8"]
FLOAT_MODES = MODES[1:]
IDS = mx.array(np.random.default_rng(0).integers(0, 509, (2, 24)))
# float32: MLX's CPU gather_mm (the MoE's unquantized affine down_proj, input 32) is float32 only.
# "*_k": shapes the fused kernels cover (hidden 128, head_dim 64).
KERNEL_SHAPES = dict(hidden_size=128, head_dim=64, intermediate_size=256, moe_intermediate_size=128)
FIXTURES = {
    "dense": dict(moe=False),
    "moe": dict(moe=True, hub_dialect=True),
    "dense_k": dict(moe=False, **KERNEL_SHAPES),
    "moe_k": dict(moe=True, hub_dialect=True, **KERNEL_SHAPES),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(fixture) → its float source; made(fixture, mode, "ours" | "mlx_lm") → converted."""
    root = tmp_path_factory.mktemp("modes")
    cache: dict[tuple, Path] = {}

    def get(fixture: str, mode: str | None = None, who: str = "ours") -> Path:
        key = (fixture, mode, who)
        if key not in cache:
            if mode is None:
                cache[key] = write_tokenizer(make_checkpoint(root / fixture, **FIXTURES[fixture]))
            elif who == "ours":
                dst = root / f"{fixture}-{mode}-ours"
                cache[key] = convert(get(fixture), dst, quantize=True, q_mode=mode, progress=False)
            else:
                dst = root / f"{fixture}-{mode}-mlx_lm"
                mlx_lm.convert(str(get(fixture)), str(dst), quantize=True, q_mode=mode)
                cache[key] = dst
        return cache[key]

    return get


def tensors_of(model_dir: Path) -> dict[str, mx.array]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(mx.load(str(path)))
    return out


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


def ours(model_dir: Path) -> np.ndarray:
    return logits(load_model(model_dir)[0])


def theirs(model_dir: Path) -> np.ndarray:
    return logits(mlx_lm.load(str(model_dir))[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_mode_equals_mlx_lm_and_both_load_both(made, fixture, mode):
    mine, mlx_lms = made(fixture, mode), made(fixture, mode, "mlx_lm")
    group_size, bits = quant.MODES[mode]

    # The same config, mlx-lm's defaults for the mode, the router 8-bit affine (no "mode")...
    q = config_of(mine)["quantization"]
    assert q == config_of(mlx_lms)["quantization"] == config_of(mine)["quantization_config"]
    assert (q["mode"], q["group_size"], q["bits"]) == (mode, group_size, bits)
    routers = {k: v for k, v in q.items() if k.endswith("mlp.gate")}
    assert routers == ({f"model.layers.{i}.mlp.gate": quant.ROUTER_SETTINGS for i in range(3)}
                       if fixture == "moe" else {})  # fmt: skip
    # ...the same tensors, bit for bit (float modes: uint8 scales, no biases)...
    a, b = tensors_of(mine), tensors_of(mlx_lms)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name
    if mode != "affine":
        assert a["model.layers.0.self_attn.q_proj.scales"].dtype == mx.uint8
        assert "model.layers.0.self_attn.q_proj.biases" not in a

    # ...each module as the config says in our loaded model...
    model = load_model(mine)[0]
    layer = model.layers[0]
    assert (layer.self_attn.q_proj.mode, layer.self_attn.q_proj.bits) == (mode, bits)
    if fixture == "moe":
        gate = layer.mlp.gate
        assert (gate.mode, gate.bits, gate.group_size) == ("affine", 8, 64)
        assert layer.mlp.switch_mlp.gate_proj.mode == mode
        assert model.model.embed_tokens.mode == mode  # tied: the output head too
    else:
        assert model.lm_head.mode == mode

    # ...and each project reads both conversions with the same logits (same arithmetic).
    reference = theirs(mlx_lms)
    for result in (logits(model), ours(mlx_lms), theirs(mine)):
        assert np.abs(result - reference).max() <= 1e-6


@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_loader_reads_float_modes_from_shapes(made, mode, tmp_path):
    """A config naming no module (only the top-level default): each module's mode comes from
    its stored shapes (uint8 scales, biases or not), as mlx-lm's loader recovers it."""
    src = made("moe", mode)
    dst = tmp_path / "bare"
    dst.mkdir()
    for path in src.iterdir():
        dst.joinpath(path.name).write_bytes(path.read_bytes())
    config = config_of(src)
    bare = {k: v for k, v in config["quantization"].items() if "." not in k}
    config["quantization"] = config["quantization_config"] = bare
    (dst / "config.json").write_text(json.dumps(config))
    model = load_model(dst)[0]
    assert model.layers[1].mlp.gate.mode == "affine" and model.layers[1].mlp.gate.bits == 8
    assert np.abs(logits(model) - ours(src)).max() == 0


def test_loader_refuses_unknown_mode_and_global_scale(made, tmp_path):
    src = made("dense", "nvfp4")
    dst = tmp_path / "odd"
    dst.mkdir()
    for path in src.iterdir():
        dst.joinpath(path.name).write_bytes(path.read_bytes())
    config = config_of(src)
    config["quantization"]["mode"] = "mxfp6"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantization mode 'mxfp6' is not supported"):
        load_model(dst)
    (dst / "config.json").write_text(json.dumps(config_of(src)))
    tensors = tensors_of(src)
    tensors["model.layers.0.self_attn.q_proj.global_scale"] = mx.array(1.0)
    for path in dst.glob("*.safetensors"):
        path.unlink()
    (dst / INDEX_FILE).unlink(missing_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), tensors)
    with pytest.raises(ConfigError, match="q_proj has a global_scale"):
        load_model(dst)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_dequantize_round_trip(made, fixture, mode, tmp_path):
    """Ours and mlx-lm's conversions → float: the float model's logits are the quantized
    one's (to float rounding) in both projects, and its tensors are mlx-lm's --dequantize's."""
    plain = convert(made(fixture), tmp_path / "f32", progress=False)
    float_names = set(tensors_of(plain))
    for who in ("ours", "mlx_lm"):
        quantized = made(fixture, mode, who)
        dst = convert(quantized, tmp_path / f"deq-{who}", dequantize=True, progress=False)
        config = config_of(dst)  # the unquantized conversion's (no "quantization")
        assert config == config_of(plain), who
        tensors = tensors_of(dst)
        assert set(tensors) == float_names
        assert all(v.dtype == mx.float32 for v in tensors.values())  # config's torch_dtype
        reference = ours(quantized)
        assert np.abs(ours(dst) - reference).max() <= 1e-4
        assert np.abs(theirs(dst) - reference).max() <= 1e-4

    mlx_lms = tmp_path / "deq-by-mlx_lm"
    mlx_lm.convert(str(made(fixture, mode, "mlx_lm")), str(mlx_lms), dequantize=True)
    expected = tensors_of(mlx_lms)
    assert set(expected) == float_names
    for name, value in tensors_of(tmp_path / "deq-mlx_lm").items():
        # mlx-lm leaves the float modes' weights in bfloat16 (MLX's default), which holds
        # their values exactly; ours are in the checkpoint's torch_dtype.
        assert mx.array_equal(value, expected[name].astype(value.dtype)).item(), name


def test_dequantize_streams_modules_split_across_shards(made, tmp_path):
    """A module's weight, scales and biases in different shards (small shards), per-module
    config entries (a mixed recipe): the same float checkpoint as from one shard."""
    src = made("moe")
    split = convert(
        src, tmp_path / "q", quant_recipe="q4_k_m", max_shard_size="24KB", progress=False
    )
    where = json.loads((split / INDEX_FILE).read_text())["weight_map"]
    modules = {k.rsplit(".", 1)[0] for k in where if k.endswith(".scales")}
    assert any(where[f"{m}.weight"] != where[f"{m}.scales"] for m in modules), "fixture: no split"
    one = convert(src, tmp_path / "q1", quant_recipe="q4_k_m", progress=False)

    a = convert(split, tmp_path / "deq", dequantize=True, max_shard_size="24KB", progress=False)
    b = convert(one, tmp_path / "deq1", dequantize=True, progress=False)
    assert len(list(a.glob("*.safetensors"))) > 1
    assert np.abs(ours(a) - ours(b)).max() == 0
    assert np.abs(ours(a) - ours(split)).max() <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


# -- the fused kernels ------------------------------------------------------------------------

QUANT_KERNELS = dict(prologue=True, linear=True, dense_mlp=True, experts=True)


def prefill_and_decode(model, plan: KernelPlan) -> list[np.ndarray]:
    """Logits of a 4-token prefill and a one-token decode step under `plan` (no compile)."""
    model.use_kernels(plan, compile=False)
    cache = [KVCache() for _ in model.layers]
    out = [model(mx.array([[1, 2, 3, 4]]), cache=cache), model(mx.array([[5]]), cache=cache)]
    return [np.array(x.astype(mx.float32)) for x in out]


def refuse(name: str, **_):
    raise AssertionError(f"kernel {name} launched")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["dense_k", "moe_k"])
def test_fused_kernels_decline_float_modes(made, fixture, mode):
    """With every quantized-layer kernel on (Metal's launch shapes, launches refused), a
    float-mode model runs the reference path, unchanged; the affine one asks for kernels (the
    shapes are covered, so the check sees a launch)."""
    model = load_model(made(fixture, mode), kernels="0")[0]
    reference = prefill_and_decode(model, KernelPlan())
    plan = KernelPlan(backend="metal", **QUANT_KERNELS)
    with kernels.launched_by(refuse, "metal"):
        if mode == "affine":
            with pytest.raises(AssertionError, match="launched"):
                prefill_and_decode(model, plan)
            return
        result = prefill_and_decode(model, plan)
    assert all(np.abs(r - e).max() == 0 for r, e in zip(result, reference, strict=True))
    if fixture == "moe_k":  # the 8-bit affine router keeps its kernel in every mode
        x = mx.zeros((1, 1, 128), mx.float32)
        assert kernels.router_covered(model.layers[0].mlp.gate, x, 8, 2)


@pytest.mark.skipif(not emulate.clang_available(), reason="clang++ not installed")
def test_float_mode_moe_runs_its_router_kernel_emulated(made):
    """Every kernel on, launched through the Metal emulator: in an mxfp4 MoE only the (affine)
    router's kernel runs, the experts fall back to gather_qmm, the logits stay."""
    model = load_model(made("moe_k", "mxfp4"), kernels="0")[0]
    reference = prefill_and_decode(model, KernelPlan())
    emulator = emulate.Emulator(seed=1)
    with kernels.launched_by(emulator, "metal"):
        result = prefill_and_decode(
            model, KernelPlan(backend="metal", router=True, **QUANT_KERNELS)
        )
    assert {launch.name for launch, _ in emulator.launches} == {"moe_router"}
    assert all(np.abs(r - e).max() <= 1e-5 for r, e in zip(result, reference, strict=True))


@pytest.mark.parametrize("mode", FLOAT_MODES)
@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_cpu_dense_head_covers_float_modes(made, fixture, mode):
    """prepare_for_inference swaps a float-mode output head for its dense copy on the CPU (its
    quantized matmul is as slow as affine's there): logits to rounding, tied lookups exact."""
    model = load_model(made(fixture, mode))[0]
    before, rows = logits(model), model.model.embed_tokens(IDS)
    prepare_for_inference(model)
    head = model.model.embed_tokens if fixture == "moe" else model.lm_head
    assert not hasattr(head, "scales")
    assert np.abs(logits(model) - before).max() <= 1e-4
    assert mx.array_equal(model.model.embed_tokens(IDS), rows).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_compiled_decode_equals_plain_decode(made, fixture, mode):
    """The compiled one-token step (CpuDecode on the CPU) computes RoPE and the q/k norms in
    q and k's dtype, not the lookup's (bfloat16 from a float-mode table in a float32 model)."""
    runs = []
    for compile in ("0", "1"):
        model = load_model(made(fixture, mode), compile=compile)[0]
        cache = [KVCache() for _ in model.layers]
        out = [model(mx.array([[1, 2, 3]]), cache=cache)]
        out += [model(mx.array([[t]]), cache=cache) for t in (4, 5, 6)]
        runs.append([np.array(x) for x in out])
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_server_slots_hold_what_the_model_writes(made, mode):
    """The server's batch KV slots take the dtype the model's K/V come out in, not a float
    mode's uint8 scales' (a float32 model: bfloat16 lookups promoted by the norms)."""
    from qwen3_mlx.server.slots import Slots

    model = load_model(made("dense", mode))[0]
    cache = [KVCache() for _ in model.layers]
    model(mx.array([[1, 2]]), cache=cache)
    slots = Slots(model, [KVCache() for _ in model.layers], 2)
    assert slots.layers[0].keys.dtype == cache[0].keys.dtype == mx.float32


# -- the flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-q", "--q-mode", "mxfp6"], "--q-mode 'mxfp6' is not supported (choose from affine, "),
        (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "--q-bits 8 is not supported with --q-mode mxfp4"),
        (["-q", "--q-mode", "mxfp8", "--q-bits", "4"], "--q-bits 4 is not supported with --q-mode mxfp8"),
        (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"], "--q-group-size 32 is not supported with --q-mode nvfp4"),
        (["--q-mode", "mxfp4", "--quant-recipe", "q4_k_m"], "--quant-recipe q4_k_m needs --q-mode affine"),
        (["-q", "--dequantize"], "-q/--quant-recipe and --dequantize: choose one"),
        (["--dequantize"], "not quantized (no 'quantization'); nothing to dequantize"),
    ],
)  # fmt: skip
def test_bad_flags_one_line(made, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc = main(["--hf-path", str(made("dense")), "--mlx-path", str(out), "--no-progress", *flags])
    stderr = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not out.exists()


def test_dequantize_refuses_gguf(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--gguf", str(tmp_path / "x.gguf"), "--mlx-path", str(out), "--dequantize"])
    stderr = capsys.readouterr().err
    assert (
        rc == 1 and stderr == "error: --dequantize reads a quantized MLX checkpoint (--hf-path)\n"
    )

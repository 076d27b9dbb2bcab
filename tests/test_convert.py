"""The converter: mlx-lm's layout, bit-identical quantization to mlx-lm, recipes, crash safety."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from qwen3_mlx import quant
from qwen3_mlx.convert import convert, main
from qwen3_mlx.errors import ConfigError, ConvertError
from qwen3_mlx.loading import load_model
from qwen3_mlx.weights import INDEX_FILE
from tests.checkpoints import make_checkpoint, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IDS = mx.array(np.random.default_rng(0).integers(0, 509, (2, 24)))
SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
SIDE_FILES += ["generation_config.json"]
# Fixture shapes: the dense default leaves o_proj/down_proj (input 96) unquantized at group
# 64, as mlx-lm does; "moe128" has every dimension divisible by 128.
FIXTURES = {
    "dense": dict(moe=False, max_shard_size="150KB"),
    "moe": dict(moe=True, hub_dialect=True, max_shard_size="200KB"),
    "moe128": dict(
        moe=True,
        hub_dialect=True,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        num_hidden_layers=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    made = {}

    def get(name):
        if name not in made:
            made[name] = write_tokenizer(make_checkpoint(root / name, **FIXTURES[name]))
        return made[name]

    return get


def all_tensors(model_dir):
    tensors = {}
    for path in Path(model_dir).glob("*.safetensors"):
        tensors.update(mx.load(str(path)))
    return tensors


def logits(model):
    return np.array(model(IDS))


def test_layout_and_unquantized_roundtrip(sources, tmp_path):
    src = sources("dense")
    dst = convert(src, tmp_path / "out", max_shard_size="100KB", progress=False)

    config = json.loads((dst / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000 and "rope_parameters" not in config  # hub dialect
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    for name in SIDE_FILES:
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    index = json.loads((dst / INDEX_FILE).read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(all_tensors(dst))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    reference = logits(load_model(src)[0])
    assert np.abs(logits(load_model(dst)[0]) - reference).max() == 0
    assert np.abs(logits(mlx_lm.load(str(dst))[0]) - reference).max() <= 1e-5


def test_moe_experts_spanning_source_shards(sources, tmp_path):
    src = sources("moe")
    index = json.loads((src / INDEX_FILE).read_text())["weight_map"]
    expert_shards = {v for k, v in index.items() if ".layers.0.mlp.experts." in k}
    assert len(expert_shards) > 1, "fixture should split layer 0's experts across shards"

    dst = convert(src, tmp_path / "out", progress=False)
    tensors = all_tensors(dst)
    assert tensors["model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (8, 32, 64)
    assert not any(".experts." in k for k in tensors)
    reference = logits(load_model(src)[0])
    assert np.abs(logits(load_model(dst)[0]) - reference).max() == 0
    assert np.abs(logits(mlx_lm.load(str(dst))[0]) - reference).max() <= 1e-5


@pytest.mark.parametrize(
    "fixture, bits, group_size",
    [("dense", 4, 64), ("dense", 8, 32), ("moe", 4, 64), ("moe", 8, 64), ("moe128", 4, 128)],
)
def test_quantized_identical_to_mlx_lm(sources, tmp_path, fixture, bits, group_size):
    src = sources(fixture)
    ours = convert(
        src, tmp_path / "ours", quantize=True, q_bits=bits, q_group_size=group_size, progress=False
    )
    theirs = tmp_path / "mlx_lm"
    mlx_lm.convert(str(src), str(theirs), quantize=True, q_bits=bits, q_group_size=group_size)

    # Same per-module choices, written the same way...
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert our_config["quantization"] == their_config["quantization"]
    assert our_config["quantization_config"] == our_config["quantization"]
    if fixture.startswith("moe"):
        assert our_config["quantization"]["model.layers.0.mlp.gate"] == {
            "group_size": 64,
            "bits": 8,
        }
    # ...the same tensors, bit for bit...
    a, b = all_tensors(ours), all_tensors(theirs)
    assert set(a) == set(b)
    assert any(k.endswith(".scales") for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name
    # ...and each project loads the other's output with the same logits.
    reference = logits(mlx_lm.load(str(theirs))[0])
    for result in (
        logits(load_model(theirs)[0]),
        logits(load_model(ours)[0]),
        logits(mlx_lm.load(str(ours))[0]),
    ):
        assert np.abs(result - reference).max() <= 1e-5


def test_mixed_recipe(sources, tmp_path):
    src = sources("moe")
    dst = convert(src, tmp_path / "q4km", quant_recipe="q4_k_m", progress=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}  # router always 8
    assert q["model.embed_tokens"]["bits"] == 6  # tied: it is the output head too
    assert q["model.layers.2.self_attn.v_proj"]["bits"] == 6  # last eighth → more bits
    assert q["model.layers.1.self_attn.v_proj"]["bits"] == 4
    assert q["model.layers.1.mlp.switch_mlp.up_proj"]["bits"] == 4

    ours = logits(load_model(dst)[0])
    assert np.abs(logits(mlx_lm.load(str(dst))[0]) - ours).max() <= 1e-5
    fp32 = logits(load_model(src)[0])
    uniform4 = logits(load_model(convert(src, tmp_path / "q4", quantize=True, progress=False))[0])
    assert np.abs(ours - fp32).mean() < np.abs(uniform4 - fp32).mean()  # more bits, less error

    # Without the per-module entries the loader recovers each module's bits from the shapes.
    config = json.loads((dst / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": 64, "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    assert np.abs(logits(load_model(dst)[0]) - ours).max() == 0

    # mlx-lm's own mixed recipe (every module listed explicitly) loads here unchanged.
    theirs = tmp_path / "mlx_lm_mixed"
    mlx_lm.convert(str(src), str(theirs), quantize=True, quant_predicate="mixed_4_6")
    assert np.abs(logits(load_model(theirs)[0]) - logits(mlx_lm.load(str(theirs))[0])).max() <= 1e-5


def test_tf5_dialect_moe_becomes_readable_by_mlx_lm(tmp_path):
    """mlx-lm can't read transformers 5's MoE config (num_local_experts, rope_parameters);
    our output is written in the hub dialect, so it loads there too."""
    src = write_tokenizer(make_checkpoint(tmp_path / "src", moe=True))
    assert "num_local_experts" in json.loads((src / "config.json").read_text())
    dst = convert(src, tmp_path / "out", quantize=True, progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert config["num_experts"] == 8 and "num_local_experts" not in config
    assert np.abs(logits(mlx_lm.load(str(dst))[0]) - logits(load_model(dst)[0])).max() <= 1e-5


def test_mixed_layer_selection_matches_llama_cpp():
    # llama.cpp use_more_bits for a 28-layer model (Qwen3-0.6B/1.7B): 0-2, 5, 8, ..., 23, 24-27
    more = [i for i in range(28) if quant.uses_more_bits(i, 28)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


def test_dtype_flag(sources, tmp_path):
    dst = convert(
        sources("dense"), tmp_path / "bf16", quantize=True, dtype="bfloat16", progress=False
    )
    tensors = all_tensors(dst)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert tensors["model.norm.weight"].dtype == mx.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == mx.bfloat16  # not quantized
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    load_model(dst)


def test_destination_rules(sources, tmp_path):
    src = sources("dense")
    dst = convert(src, tmp_path / "out", progress=False)
    with pytest.raises(ConvertError, match=r"already exists \(pass --force"):
        convert(src, dst, quantize=True, progress=False)
    convert(src, dst, quantize=True, force=True, progress=False)
    assert "quantization" in json.loads((dst / "config.json").read_text())
    with pytest.raises(ConvertError, match="would overwrite the source"):
        convert(src, src, force=True, progress=False)
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "cli"), "--no-progress"]) == 0


def test_killed_conversion_leaves_no_model(tmp_path):
    """SIGKILL mid-way: the destination never appears; a rerun cleans up and succeeds."""
    src = make_checkpoint(tmp_path / "src", max_shard_size="100KB")
    dst = tmp_path / "dst"
    # A second after each source shard: time to see a part written and kill the run.
    script = (
        "import sys; from qwen3_mlx.convert import convert; "
        "convert(sys.argv[1], sys.argv[2], max_shard_size='50KB', progress=False, shard_delay=1.0)"
    )
    cmd = [sys.executable, "-c", script, str(src), str(dst)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".dst.converting-*/part-*.safetensors")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "converter wrote nothing in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not dst.exists()
    with pytest.raises(ConfigError):
        load_model(dst)
    assert list(tmp_path.glob(".dst.converting-*"))  # the killed run's leftovers...
    convert(src, dst, progress=False)
    assert not list(tmp_path.glob(".dst.converting-*"))  # ...are removed by the next run
    load_model(dst)


@pytest.mark.slow
def test_peak_memory_is_bounded(tmp_path):
    """benchmarks/convert_memory.py: peak RSS stays far below the checkpoint and flat in its size."""
    script = ROOT / "benchmarks" / "convert_memory.py"
    cmd = [sys.executable, str(script), "--results", str(tmp_path / "memory.json")]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)

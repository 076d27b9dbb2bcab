"""Bad input gets one clear line naming the file or field, from the converter and the loader."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_mlx.convert import convert, main
from qwen3_mlx.errors import ConfigError, ConvertError, Qwen3MLXError, WeightsError
from qwen3_mlx.loading import load_model
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARD2 = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", max_shard_size="200KB")


@pytest.fixture
def src(pristine, tmp_path):
    assert (pristine / SHARD2).exists()
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def run_cli(*args):
    """Run the converter CLI in a fresh interpreter; return (exit code, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3_mlx.convert", "--no-progress", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stderr


def assert_one_line_error(rc, stderr, *fragments):
    assert rc == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def convert_error(src, dst, **kwargs) -> Qwen3MLXError:
    with pytest.raises(Qwen3MLXError) as info:
        convert(src, dst, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert not Path(dst).exists()
    return info.value


def run_main(capsys, *args):
    """The CLI's entry point in-process (a fresh interpreter costs seconds per start)."""
    rc = main(["--no-progress", *map(str, args)])
    return rc, capsys.readouterr().err


# --- through the command line -----------------------------------------------------------------


def test_cli_missing_shard(src, tmp_path):
    (src / SHARD2).unlink()
    rc, stderr = run_cli("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line_error(rc, stderr, "error:", f"missing shard {SHARD2}", str(src))
    assert not (tmp_path / "out").exists()


def test_cli_truncated_shard(src, tmp_path, capsys):
    path = src / SHARD2
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, stderr = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out", "-q")
    assert_one_line_error(rc, stderr, str(path), "truncated")


def test_cli_unsupported_bits_and_group_size(src, tmp_path, capsys):
    rc, stderr = run_main(
        capsys, "--hf-path", src, "--mlx-path", tmp_path / "out", "-q", "--q-bits", "7"
    )
    assert_one_line_error(rc, stderr, "--q-bits 7 is not supported", "2, 3, 4, 5, 6, 8")
    for kwargs, message in [
        (dict(q_group_size=48), "--q-group-size 48 is not supported"),
        (dict(quant_recipe="q5_k_s"), "--quant-recipe 'q5_k_s' is not a known recipe"),
        (dict(quant_recipe="mixed_4_6", q_bits=3), "--q-bits 3 conflicts with --quant-recipe"),
        (dict(q_mode="mxfp6"), "--q-mode 'mxfp6' is not supported"),
    ]:
        error = convert_error(src, tmp_path / "out", quantize=True, **kwargs)
        assert isinstance(error, ConvertError) and message in str(error)
    error = convert_error(src, tmp_path / "out", dtype="float8")
    assert isinstance(error, ConvertError) and "--dtype 'float8'" in str(error)


# --- in-process: the converter and the loader share the checks --------------------------------


def test_missing_shard_loader(src):
    (src / SHARD2).unlink()
    with pytest.raises(WeightsError, match=f"missing shard {SHARD2}"):
        load_model(src)


def test_truncated_shard_loader(src):
    path = src / SHARD2
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated") as info:
        load_model(src)
    assert str(path) in str(info.value)


def test_corrupt_shard(src, tmp_path):
    path = src / SHARD2
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # garbage in the JSON header
    path.write_bytes(bytes(data))
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, WeightsError)
    assert str(path) in str(error) and "corrupt safetensors header" in str(error)
    with pytest.raises(WeightsError, match="corrupt"):
        load_model(src)


def test_corrupt_tensor_entry(src, tmp_path):
    """A header whose byte ranges disagree with the dtype/shape it declares."""
    path = src / SHARD2
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    path.write_bytes(raw[:8] + text + raw[8 + size :])
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, WeightsError) and f"tensor {name!r}" in str(error)


def test_other_architecture(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, ConfigError)
    assert "config.json" in str(error) and "model_type 'llama' is not a Qwen3" in str(error)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        load_model(src)


def test_shape_mismatch(tmp_path):
    """config.json says hidden_size 64, the weights were saved with 32."""
    src = make_checkpoint(tmp_path / "src", hidden_size=32)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, WeightsError)
    assert re.search(
        r"/model\.safetensors: tensor (lm_head|model\.embed_tokens)\.weight has shape \(512, 32\), "
        r"config\.json implies \(512, 64\)$",
        str(error),
    ), error
    with pytest.raises(WeightsError, match=r"has shape \(\d+, 32\), config.json implies"):
        load_model(src)


def test_missing_tensor(src, tmp_path):
    """An untied config over weights without lm_head.weight (e.g. a mixed-up config.json)."""
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]  # dropped as tied: fine, no error
    convert(src, tmp_path / "tied", progress=False)
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, WeightsError) and "missing tensor model.layers.2." in str(error)


def test_missing_expert(tmp_path):
    src = make_checkpoint(tmp_path / "src", moe=True)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    error = convert_error(src, tmp_path / "out")
    assert isinstance(error, WeightsError)
    assert "missing tensor model.layers.1.mlp.experts.3.up_proj.weight" in str(error)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    error = convert_error(tmp_path / "empty", tmp_path / "out")
    assert isinstance(error, ConfigError) and "config.json: not found" in str(error)
    error = convert_error(tmp_path / "nope", tmp_path / "out")
    assert isinstance(error, ConfigError) and "no such directory" in str(error)


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    error = convert_error("Qwen/Qwen3-0.6B", tmp_path / "out")
    assert isinstance(error, ConfigError) and "Qwen/Qwen3-0.6B: not found locally" in str(error)


def test_already_quantized_source(src, tmp_path):
    out = convert(src, tmp_path / "q", quantize=True, progress=False)
    error = convert_error(out, tmp_path / "again", quantize=True)
    assert isinstance(error, ConvertError) and "already quantized" in str(error)

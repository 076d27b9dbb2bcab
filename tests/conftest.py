"""Shared fixtures. Helpers append here; keep each fixture small and session-scoped when costly."""

from __future__ import annotations

import pytest

# -- tokenizer (real Qwen vocabulary, built once from dashscope's qwen.tiktoken and cached) --


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    """Directory with Qwen3's tokenizer.json + tokenizer_config.json (read-only, no chat template)."""
    from convert.qwen_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    from qwen3_mlx.tokenizer import load_tokenizer

    return load_tokenizer(qwen3_tokenizer_dir)


# -- a tiny random Qwen3 with the real tokenizer (generation tests) ------------------------

TINY_QWEN3 = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, torch_dtype="float32",
)  # fmt: skip


def write_tiny_qwen3(out_dir, seed: int = 0, **overrides):
    """Write a random Qwen3 with Qwen's 151,936-row vocabulary and real tokenizer files.

    Built with MLX alone (no torch): the weights only need to be deterministic, not
    transformers-made; tests/checkpoints.py covers parity with transformers.
    """
    import json
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from convert.qwen_tokenizer import build_qwen3_tokenizer
    from qwen3_mlx.loading import build_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**TINY_QWEN3, **overrides}
    mx.random.seed(seed)
    model = build_model(config)
    weights = {k: v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, {"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    build_qwen3_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Directory of a tiny random Qwen3 (real tokenizer, no chat template: the built-in one)."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_qwen3_dir):
    """(model, tokenizer) of `tiny_qwen3_dir`."""
    from qwen3_mlx.loading import load

    return load(tiny_qwen3_dir)


# -- real server processes (tests/test_server_*.py), started once per session ------------------


@pytest.fixture(scope="session")
def demo_model_dir():
    """The demo model's directory ($QWEN3_MLX_TEST_DEMO overrides it, e.g. a fresh training run)."""
    import os
    from pathlib import Path

    from qwen3_mlx.assets import DEMO_MODEL_PATH

    path = Path(os.environ.get("QWEN3_MLX_TEST_DEMO") or DEMO_MODEL_PATH)
    if not (path / "conversations.json").is_file():
        pytest.skip(f"the demo model ({path}) is not built")
    return path


@pytest.fixture(scope="session")
def demo_conversations(demo_model_dir):
    """{name: record} from the demo model's conversations.json."""
    import json

    records = json.loads((demo_model_dir / "conversations.json").read_text())
    if isinstance(records, dict):
        records = records.get("conversations", records)
    return {r["name"]: r for r in records} if isinstance(records, list) else records


@pytest.fixture(scope="session")
def demo_server(demo_model_dir):
    """`python -m qwen3_mlx.server` serving the demo model alone (any model name is accepted)."""
    from tests.server_process import ServerProcess

    server = ServerProcess(
        ["--model", str(demo_model_dir), "--max-tokens-limit", "512", "--max-concurrency", "16"]
    )
    yield server
    server.stop()

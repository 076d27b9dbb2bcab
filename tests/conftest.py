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

"""fp32 parity with transformers over the Qwen3 feature matrix, full forward and cached decoding.

Each case writes a tiny random checkpoint with transformers (both config dialects), runs the
reference forward in torch, then checks ours on whole prompts (≤ 1e-4 max abs logits) and
token by token through the KV cache (the same logits as the full forward).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import KVCache

from qwen3_mlx.loading import load_model
from tests.checkpoints import YARN, make_checkpoint

TOLERANCE = 1e-4
PROMPT = np.random.default_rng(1).integers(0, 512, (2, 33))

DENSE_CASES = {
    "tied-hub": dict(tie_word_embeddings=True, hub_dialect=True),
    "untied-headdim24-tf5": dict(tie_word_embeddings=False, head_dim=24),
    "headdim-eq-hidden/heads-tied-tf5": dict(tie_word_embeddings=True, head_dim=16),
    "yarn-untied-hub": dict(rope_scaling=YARN, hub_dialect=True),
    "yarn-tied-tf5": dict(rope_scaling=YARN, tie_word_embeddings=True),
}
MOE_CASES = {
    "mlp-only-layers-tied-tf5": dict(mlp_only_layers=[1], tie_word_embeddings=True),
    "sparse-step2-untied-hub": dict(
        decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=False, hub_dialect=True
    ),
    "no-norm-topk-tied-tf5": dict(norm_topk_prob=False, num_hidden_layers=2),
    "yarn-untied-mlp-only-hub": dict(
        rope_scaling=YARN, mlp_only_layers=[0], tie_word_embeddings=False, hub_dialect=True
    ),
    "yarn-tied-sparse-step2-tf5": dict(rope_scaling=YARN, decoder_sparse_step=2, num_experts=4),
}
CASES = [
    pytest.param(dict(moe=False, **kw), id=f"dense-{name}") for name, kw in DENSE_CASES.items()
]
CASES += [pytest.param(dict(moe=True, **kw), id=f"moe-{name}") for name, kw in MOE_CASES.items()]


def reference_logits(path, ids, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def cached_logits(model, ids, prefill=5):
    """Prefill a few tokens, then decode one token at a time through the KV cache."""
    cache = [KVCache() for _ in model.layers]
    steps = [np.array(model(mx.array(ids[:, :prefill]), cache))]
    for i in range(prefill, ids.shape[1]):
        steps.append(np.array(model(mx.array(ids[:, i : i + 1]), cache)))
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_transformers(tmp_path, kwargs):
    path = make_checkpoint(tmp_path / "ckpt", **kwargs)
    ref = reference_logits(path, PROMPT)
    model, _ = load_model(path)
    if kwargs["moe"]:  # the case must really exercise both block kinds where it says so
        kinds = {type(layer.mlp).__name__ for layer in model.layers}
        assert "SparseMoeBlock" in kinds
        assert ("MLP" in kinds) == bool(
            kwargs.get("mlp_only_layers") or kwargs.get("decoder_sparse_step", 1) > 1
        )

    full = np.array(model(mx.array(PROMPT)))
    assert np.abs(full - ref).max() <= TOLERANCE
    assert np.abs(cached_logits(model, PROMPT) - full).max() <= TOLERANCE


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bfloat16_checkpoint_loads(tmp_path, moe):
    """A bf16 checkpoint loads as bf16; upcast, it matches transformers' fp32 run on it."""
    path = make_checkpoint(tmp_path / "ckpt", moe=moe, dtype="bfloat16")
    model, _ = load_model(path)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    model.update(tree_map(lambda v: v.astype(mx.float32), model.parameters()))
    ref = reference_logits(path, PROMPT[:, :16], dtype="float32")
    assert np.abs(np.array(model(mx.array(PROMPT[:, :16]))) - ref).max() <= TOLERANCE

"""Fast smoke parity: one dense (YaRN, untied) and one MoE checkpoint against transformers."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from qwen3_mlx.loading import load_model
from tests.checkpoints import YARN, make_checkpoint


@pytest.mark.parametrize(
    "kwargs",
    [dict(moe=False, rope_scaling=YARN, hub_dialect=True), dict(moe=True)],
    ids=["dense-yarn-hub", "moe-tf5"],
)
def test_logits_match_transformers(tmp_path, kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    path = make_checkpoint(tmp_path / "ckpt", **kwargs)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 512, (2, 40))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()

    model, _ = load_model(path)
    out = np.array(model(mx.array(ids)))
    assert np.abs(out - ref).max() <= 1e-4

    cache = [KVCache() for _ in model.layers]
    steps = [np.array(model(mx.array(ids[:, :7]), cache))]
    steps += [np.array(model(mx.array(ids[:, i : i + 1]), cache)) for i in range(7, 40)]
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() <= 1e-4

"""Tiny random Qwen3 checkpoints written by transformers, for parity and end-to-end tests.

transformers 5 saves its own config dialect (`rope_parameters`, `num_local_experts`, `dtype`);
`hub_dialect=True` rewrites config.json the way Qwen publishes it on the hub (`rope_theta`,
`rope_scaling`, `num_experts`, `torch_dtype`), since that is what users load.
"""

from __future__ import annotations

import json
from pathlib import Path

DENSE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
    tie_word_embeddings=False,
)  # fmt: skip
MOE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_experts=8, num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


def make_checkpoint(
    out_dir: str | Path,
    *,
    moe: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    hub_dialect: bool = False,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Write a random Qwen3 (or Qwen3-MoE) checkpoint with transformers; return its directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out_dir = Path(out_dir)
    params = {**(MOE if moe else DENSE), **overrides}
    rope_scaling = params.pop("rope_scaling", None)
    rope_theta = params.pop("rope_theta", 1_000_000.0)
    params["rope_parameters"] = {
        "rope_type": "default",
        **(rope_scaling or {}),
        "rope_theta": rope_theta,
    }
    torch.manual_seed(seed)
    config = (Qwen3MoeConfig if moe else Qwen3Config)(**params)
    model = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(config)
    # Random init is tiny; widen it so logits differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if hub_dialect:
        to_hub_dialect(out_dir / "config.json")
    return out_dir


def to_hub_dialect(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    params = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = params.pop("rope_theta", 1_000_000.0)
    config["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(config, indent=2))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A tiny word-level tokenizer beside a tiny checkpoint (mlx_lm.load/convert need one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out_dir = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = vocab_size - len(specials)
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({tok: words + i for i, tok in enumerate(specials)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 512,
            },
            indent=2,
        )
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir

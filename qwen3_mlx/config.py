"""Qwen3 model configuration: one dataclass for dense and MoE checkpoints.

Two config dialects exist in the wild and both are accepted:
  * as Qwen published it on the hub: `rope_theta`, `rope_scaling`, `num_experts`, `torch_dtype`;
  * as transformers 5 writes it:      `rope_parameters`, `num_local_experts`, `dtype`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int = 0
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses the MoE block (else a dense MLP)."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        config = normalize_config(config, source)
        known = {f.name for f in fields(cls)}
        required = [
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ]
        for name in required:
            if name not in config:
                raise ConfigError(f"{source}: missing required field '{name}'")
        args = {k: v for k, v in config.items() if k in known}
        args.setdefault("num_key_value_heads", config["num_attention_heads"])
        if config["model_type"] == "qwen3_moe":
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                if not config.get(name):
                    raise ConfigError(f"{source}: qwen3_moe config needs '{name}'")
        elif "intermediate_size" not in config:
            raise ConfigError(f"{source}: missing required field 'intermediate_size'")
        if config["model_type"] == "qwen3":
            args["num_experts"] = 0
        try:
            return cls(**args)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ConfigError(f"{source}: {e}") from None


def normalize_config(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Map either config dialect onto the hub dialect (the one mlx-lm writes too)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    config = dict(config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not a Qwen3 architecture "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if "num_local_experts" in config and "num_experts" not in config:
        config["num_experts"] = config.pop("num_local_experts")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]

    params = config.pop("rope_parameters", None)
    if params is not None:
        params = dict(params)
        if "rope_theta" in params:
            config.setdefault("rope_theta", params.pop("rope_theta"))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = params

    scaling = config.get("rope_scaling")
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "yarn", "linear"):
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported")
        if rope_type == "default":
            config["rope_scaling"] = None
    return config


def load_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a model directory?)") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    normalize_config(config, str(path))  # validates the architecture early
    return config


@lru_cache(maxsize=16)
def _read_generation_config(path: str, mtime: float) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def generation_config(model_dir: str | Path | None) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} when there is none): sampling defaults and
    end-of-turn ids. The one place the file is read (cached per file version)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    return _read_generation_config(str(path), path.stat().st_mtime)

"""KV caches for generation: plain, quantized, rotating; prefix reuse; prompt-cache files.

The cache objects themselves are mlx-lm's (`mlx_lm.models.cache`); the model's attention
uses mlx-lm's masks and SDPA, so every one of them works unchanged:

    make_cache(model)                      KVCache per layer: grows in steps of 256 tokens
    make_cache(model, kv_bits=8)           QuantizedKVCache: keys/values stored in 8 (or 4) bits
                                           with one scale/bias per kv_group_size values,
                                           ~2x (~3.5x) less memory than bf16
    make_cache(model, max_kv_size=4096)    RotatingKVCache: holds the first 4 tokens plus the
                                           latest max_kv_size - 4; older ones are overwritten,
                                           so memory is bounded and generation never has to stop

`PromptCache` pairs a cache with the token ids it holds. Before a new prompt is
prefilled, `reuse(prompt)` trims the cache back to the longest common prefix, so only
the new tokens are computed: a chat's next turn prefills the new user message, not the
whole conversation. (Trimming matters: Qwen3's template drops earlier turns' reasoning,
so the tokens the model generated inside <think> are not in the next prompt.) A rotating
cache that has already wrapped around can't be trimmed; it is then started afresh.

`save_prompt_cache` / `load_prompt_cache` write a PromptCache to a .safetensors file
with its tokens and the model it belongs to, e.g. to keep a long system prompt or
document prefilled between runs.

Long context
------------
Qwen3 is trained for 32,768 tokens (max_position_embeddings is 40,960 for the dense
models) and reaches 131,072 with YaRN, which Qwen enables by adding to config.json

    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

Here that is `load(path, long_context=True)` (or `--long-context` on the command line),
which applies `enable_long_context(config)` at load time without touching the files.
Qwen notes that static YaRN can slightly lower quality on short texts, so only switch it
on when prompts exceed ~32K tokens. The KV cache then grows with the context: budget
2 x layers x kv_heads x head_dim x 2 bytes per token (bf16), or use kv_bits=8 / 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from .errors import GenerationError

# The first tokens (Qwen's "<|im_start|>system\n...") stay in a rotating cache: attention
# sinks keep the model stable once the window slides (mlx-lm's choice too).
ROTATING_KEEP = 4
LONG_CONTEXT_FACTOR = 4.0
NATIVE_CONTEXT = 32768

_METADATA_FORMAT = "qwen3_mlx.prompt_cache/1"


def make_cache(
    model: Any,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    max_kv_size: int | None = None,
) -> list[Any]:
    """One mlx-lm cache object per layer of `model` (see the module docstring)."""
    layers = len(model.layers)
    if kv_bits is not None:
        if max_kv_size is not None:
            raise GenerationError(
                "kv_bits: a quantized KV cache can't also be bounded (max_kv_size)"
            )
        if kv_bits not in (2, 3, 4, 5, 6, 8):
            raise GenerationError(f"kv_bits: must be one of 2, 3, 4, 5, 6, 8, got {kv_bits!r}")
        head_dim = getattr(getattr(model, "args", None), "head_dim", None)
        if kv_group_size not in (32, 64, 128) or (head_dim and head_dim % kv_group_size):
            raise GenerationError(
                f"kv_group_size: must be 32, 64 or 128 and divide head_dim ({head_dim}), "
                f"got {kv_group_size!r}"
            )
        return [
            mlx_cache.QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)
            for _ in range(layers)
        ]
    if max_kv_size is not None:
        if (
            isinstance(max_kv_size, bool)
            or not isinstance(max_kv_size, int)
            or max_kv_size <= ROTATING_KEEP
        ):
            raise GenerationError(
                f"max_kv_size: must be an integer > {ROTATING_KEEP}, got {max_kv_size!r}"
            )
        return [
            mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=ROTATING_KEEP)
            for _ in range(layers)
        ]
    return [mlx_cache.KVCache() for _ in range(layers)]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def cache_offset(cache: list[Any]) -> int:
    """Tokens the cache has seen (for a rotating cache, more than it still holds)."""
    return cache[0].offset if cache else 0


def is_bounded(cache: list[Any]) -> bool:
    return any(isinstance(c, mlx_cache.RotatingKVCache) for c in cache)


class PromptCache:
    """A KV cache (one mlx-lm cache object per layer) and the token ids it holds."""

    def __init__(self, layers: list[Any], tokens: list[int] | None = None):
        self.layers = layers
        self.tokens: list[int] = list(tokens or [])

    def __len__(self) -> int:
        return len(self.tokens)

    def reuse(self, prompt: list[int]) -> int:
        """Trim to the longest prefix shared with `prompt`; return how many prompt tokens it covers.

        At least one prompt token is always left to prefill: its logits pick the first
        new token.
        """
        keep = min(common_prefix_length(self.tokens, prompt), len(prompt) - 1)
        drop = len(self.tokens) - keep
        if drop > 0 and not self._trim(drop):
            self.reset()
            return 0
        return keep

    def _trim(self, n: int) -> bool:
        if cache_offset(self.layers) != len(self.tokens):
            return False  # someone fed the cache behind our back: its contents are unknown
        if not mlx_cache.can_trim_prompt_cache(self.layers):
            return False
        mlx_cache.trim_prompt_cache(self.layers, n)
        del self.tokens[len(self.tokens) - n :]
        return True

    def reset(self) -> None:
        """Empty the cache (same kind: quantized / rotating settings are kept)."""
        self.layers = [_fresh_like(c) for c in self.layers]
        self.tokens = []

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


def _fresh_like(c: Any) -> Any:
    if isinstance(c, mlx_cache.QuantizedKVCache):
        return mlx_cache.QuantizedKVCache(group_size=c.group_size, bits=c.bits)
    if isinstance(c, mlx_cache.RotatingKVCache):
        return mlx_cache.RotatingKVCache(max_size=c.max_size, keep=c.keep)
    return type(c)()


# -- transposed keys (CPU decode) --------------------------------------------------

_KEYS_T = "_qwen3_mlx_keys_t"


def transposed_keys(cache: mlx_cache.KVCache, k: mx.array, position: int) -> mx.array:
    """The keys of a plain KVCache as (B, kv_heads, head_dim, capacity), the new key `k`
    (B, kv_heads, 1, head_dim) at `position` included; call after the cache update.

    MLX's CPU backend multiplies through a reference BLAS whose q @ K^T is a loop of
    dependent dot products, while q @ K^T-stored-transposed streams; the CPU decode step
    keeps this copy next to the cache (one more copy of the keys, decode only). It is kept
    up to date one column per step and rebuilt from the cache whenever that could be stale:
    the cache grew, was trimmed, or was written outside the CPU decode step (the model
    drops the copies then, see drop_transposed_keys).
    """
    keys = cache.keys
    held = cache.__dict__.get(_KEYS_T)
    if held is not None:
        kt, length, keys_id = held
        if length == position and keys_id == id(keys) and kt.shape[-1] == keys.shape[2]:
            kt[..., position : position + 1] = k.swapaxes(-1, -2)
            cache.__dict__[_KEYS_T] = (kt, position + 1, keys_id)
            return kt
    B, kv_heads, capacity, head_dim = keys.shape
    filled = keys[:, :, : position + 1].swapaxes(-1, -2)
    rest = mx.zeros((B, kv_heads, head_dim, capacity - position - 1), keys.dtype)
    kt = mx.concatenate([filled, rest], axis=-1)
    cache.__dict__[_KEYS_T] = (kt, position + 1, id(keys))
    return kt


def drop_transposed_keys(caches: list[Any]) -> None:
    """Forget transposed_keys' copies (the caches are about to be written another way)."""
    for c in caches:
        if c is not None and _KEYS_T in getattr(c, "__dict__", ()):
            del c.__dict__[_KEYS_T]


# -- files -------------------------------------------------------------------------


def save_prompt_cache(
    path: str | Path, cache: PromptCache, model_id: str = "", **metadata: str
) -> None:
    """Write `cache` (KV state + tokens) to a .safetensors file."""
    if not cache.tokens:
        raise GenerationError(f"{path}: the prompt cache is empty, nothing to save")
    meta = {
        "format": _METADATA_FORMAT,
        "model": str(model_id),
        "tokens": json.dumps(cache.tokens),
        **{k: str(v) for k, v in metadata.items()},
    }
    mlx_cache.save_prompt_cache(str(path), cache.layers, meta)


def load_prompt_cache(
    path: str | Path, model: Any = None, model_id: str | None = None
) -> PromptCache:
    """Read a file written by `save_prompt_cache`; check it fits `model` / `model_id` if given."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{path}: no such prompt cache file")
    try:
        layers, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:  # safetensors / metadata parse errors
        raise GenerationError(f"{path}: not a prompt cache file ({e})") from None
    if meta.get("format") != _METADATA_FORMAT:
        raise GenerationError(
            f"{path}: not a qwen3_mlx prompt cache (format {meta.get('format')!r})"
        )
    if model_id is not None and meta.get("model") and meta["model"] != str(model_id):
        raise GenerationError(f"{path}: made for model {meta['model']!r}, not {model_id!r}")
    if model is not None and len(layers) != len(model.layers):
        raise GenerationError(
            f"{path}: has {len(layers)} layers, the model has {len(model.layers)} (another model?)"
        )
    tokens = json.loads(meta["tokens"])
    if cache_offset(layers) != len(tokens):
        raise GenerationError(
            f"{path}: holds {cache_offset(layers)} positions but {len(tokens)} tokens"
        )
    cache = PromptCache(layers, tokens)
    cache.metadata = meta
    return cache


# -- long context ------------------------------------------------------------------


def enable_long_context(
    config: dict[str, Any],
    factor: float = LONG_CONTEXT_FACTOR,
    native_context: int = NATIVE_CONTEXT,
) -> dict[str, Any]:
    """A copy of `config` with YaRN scaling to factor x native_context (131,072 by default).

    A config that already has rope scaling is returned unchanged.
    """
    config = dict(config)
    existing = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    if existing.get("rope_type", existing.get("type", "default")) not in ("default", None):
        return config
    config["rope_scaling"] = {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(native_context),
    }
    config["max_position_embeddings"] = int(native_context * factor)
    return config

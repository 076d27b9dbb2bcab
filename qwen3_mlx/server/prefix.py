"""The server's prefix cache: KV caches of recent sequences, so the next turn of a conversation
prefills only its new tokens."""

from __future__ import annotations

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..cache import common_prefix_length as _common_prefix

# Prefixes shorter than this are not worth a store entry (or a wait for one).
PREFIX_MIN = 16


class PrefixStore:
    """KV caches of recent sequences, keyed by the tokens they hold (least recently used out).

    `token_bytes`: count each entry as its tokens x this instead of its arrays' bytes, which differ
    from rank to rank under `--parallel` (eviction must be the same decision everywhere).
    """

    def __init__(
        self, max_entries: int = 16, max_bytes: int = 2 << 30, token_bytes: int | None = None
    ):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.token_bytes = token_bytes
        self.entries: list[tuple[list[int], list[KVCache]]] = []

    def match(self, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens `lookup` would reuse (nothing is copied)."""
        best = max((_common_prefix(tokens, prompt) for tokens, _ in self.entries), default=0)
        return max(0, min(best, len(prompt) - 1))

    def lookup(self, prompt: list[int]) -> tuple[int, list[KVCache] | None]:
        """(tokens reused, fresh caches holding them). At least one prompt token is left over."""
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = _common_prefix(tokens, prompt)
            if n > best_len:
                best, best_len = i, n
        best_len = min(best_len, len(prompt) - 1)
        if best is None or best_len <= 0:
            return 0, None
        tokens, layers = self.entries.pop(best)
        self.entries.append((tokens, layers))  # most recently used last
        return best_len, [copy_prefix(c, best_len) for c in layers]

    def store(self, tokens: list[int], layers: list[KVCache]) -> None:
        if not tokens:
            return
        # An entry that this one extends is redundant.
        self.entries = [
            e for e in self.entries if _common_prefix(e[0], tokens) < min(len(e[0]), len(tokens))
        ]
        self.entries.append((list(tokens), layers))
        while len(self.entries) > self.max_entries or (
            len(self.entries) > 1 and self.nbytes > self.max_bytes
        ):
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        if self.token_bytes is not None:
            return sum(len(tokens) for tokens, _ in self.entries) * self.token_bytes
        return sum(c.nbytes for _, layers in self.entries for c in layers)


def kv_bytes_per_token(model) -> int:
    """KV cache bytes per token of the whole model (every layer, every KV head), whatever part of
    it this process holds: the same number on every rank."""
    args = model.args
    dtype = next(layer for layer in model.layers if layer is not None).input_layernorm.weight.dtype
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype.size


def copy_prefix(cache: KVCache | QuantizedKVCache, n: int) -> KVCache | QuantizedKVCache:
    """The first `n` positions of a plain or quantized cache, as a cache of the same kind.

    Slicing makes new arrays, so the stored entry is never written through this copy."""
    if isinstance(cache, QuantizedKVCache):
        copy = QuantizedKVCache(group_size=cache.group_size, bits=cache.bits)
        copy.keys = tuple(part[..., :n, :] for part in cache.keys)
        copy.values = tuple(part[..., :n, :] for part in cache.values)
    else:
        copy = KVCache()
        copy.keys = cache.keys[..., :n, :]
        copy.values = cache.values[..., :n, :]
    copy.offset = n
    return copy

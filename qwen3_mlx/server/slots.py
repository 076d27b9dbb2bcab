"""The running batch's KV cache: a fixed number of slots, every row's tokens ending at one column.

Per layer, keys and values are (slots, kv_heads, capacity, head_dim). A row's K/V occupy columns
[pad, end) of its slot, where `end` is shared by all rows: a decode step writes every row's new
K/V with one slice update at column `end` (as a plain `KVCache` does for one row), attention masks
each slot's columns before its `pad`, and RoPE takes each row's own position, `end - pad`. This is
mlx-lm's left-padded `BatchKVCache` layout with three differences that matter on the hot path:

- The number of slots is a bucket (`BUCKETS`), not the number of rows. Rows join into a free slot
  and leave it free, so the compiled decode step sees only bucket shapes, each traced at start-up
  (`Engine` warm-up): no request waits for a retrace when rows come and go. A free slot decodes a
  zero vector (`Batch.forward` zeroes its embedding), which every layer keeps at zero (RMSNorm,
  q/k/v, attention over its one visible column and the feed-forward all map zero to zero), so it
  routes to one fixed set of experts and costs no extra weight reads beyond that set.
- Positions and the mask are made once per step for all layers, from host-side integers: no
  per-layer offset arithmetic and no device-to-host read when rows leave. Where the decode
  attention kernel runs (CUDA), it reads each slot's first column (`row_starts`) instead of a
  mask: MLX's CUDA attention has no fused kernel for a mask array.
- Joining copies only the newcomer's K/V into its slot; the other rows are copied only when a
  newcomer is longer than `end` (everything shifts right) or the bucket changes.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..cache import ROTATING_KEEP

# Batch shapes the decode step is compiled for: powers of two. Each costs a compile at start-up
# (on the H100's CUDA backend, ~6 s for the 30B-A3B shape with a warm kernel cache), and a free
# slot costs compute only, which a decode step has to spare (it waits on weight reads).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Capacities are STEP x 2^k columns up to GROW_MAX, then multiples of GROW_MAX. mlx-lm's KVCache
# grows by 256 columns: a batch of long rows would get a new, larger set of K/V arrays every 256
# steps, each a size MLX's buffer cache has never held. On the H100 a decode turn that met new, large arrays took 1.6-3 s, about every 256 steps
# while rows decoded thousands of tokens (benchmarks/results/serve_h100_notes.md, 2026-12-08).
# Doubling makes such sizes few, and every other change of the columns (a longer newcomer
# shifting the rows, unused columns dropped) keeps the capacity, so a shape is met once.
STEP = 256
GROW_MAX = 4096
# A windowed row (--max-kv-size) always attends to its first tokens, as mlx-lm's rotating cache.
KEEP = ROTATING_KEEP


def bucket_for(rows: int) -> int:
    """The smallest bucket holding `rows` rows (beyond the last, `rows` itself)."""
    return next((b for b in BUCKETS if b >= rows), rows)


def buckets_up_to(rows: int) -> list[int]:
    """Every bucket a batch of at most `rows` rows can use."""
    return sorted({bucket_for(n) for n in range(1, rows + 1)})


def _parts(x) -> tuple[mx.array, ...]:
    """A cache's keys (or values) as a tuple: one array, or a quantized cache's (data, scales,
    biases)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _whole(parts: tuple[mx.array, ...], quantized: bool):
    return parts if quantized else parts[0]


class SlotLayer:
    """One layer's keys and values, seen by the model as a cache object (update_and_fetch,
    offset, make_mask, state). Each is stored as parts: one array, or with --kv-bits a quantized
    cache's (data, scales, biases), which mlx-lm's attention reads as they are."""

    def __init__(self, slots: Slots, keys: tuple, values: tuple):
        self.slots = slots
        self.key_parts = keys
        self.value_parts = values

    @property
    def keys(self):
        return _whole(self.key_parts, self.slots.quantized)

    @property
    def values(self):
        return _whole(self.value_parts, self.slots.quantized)

    @property
    def offset(self) -> mx.array:
        return self.slots.positions

    def update_and_fetch(self, k: mx.array, v: mx.array):
        end, quantized = self.slots.end, self.slots.quantized
        if quantized:
            k = mx.quantize(k, group_size=self.group_size, bits=self.bits)
            v = mx.quantize(v, group_size=self.group_size, bits=self.bits)
        for stored, new in zip(
            self.key_parts + self.value_parts, _parts(k) + _parts(v), strict=True
        ):
            stored[..., end : end + 1, :] = new
        return (
            _whole(tuple(p[..., : end + 1, :] for p in self.key_parts), quantized),
            _whole(tuple(p[..., : end + 1, :] for p in self.value_parts), quantized),
        )

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return self.slots.mask

    @property
    def row_starts(self) -> mx.array | None:
        """Each slot's first visible column (int32), when that is all its mask says: a decode
        attention kernel can then skip the mask (kernels.decode_attention_covered)."""
        return self.slots.row_starts

    @property
    def state(self) -> tuple[mx.array, ...]:
        return self.key_parts + self.value_parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.state)

    def depend_on(self, h: mx.array) -> None:
        """Evaluating this layer runs `h` too (a pipeline stage's send; see distributed)."""
        self._map(lambda p: mx.depends(p, h))

    def _map(self, fn) -> None:
        self.key_parts = tuple(fn(p) for p in self.key_parts)
        self.value_parts = tuple(fn(p) for p in self.value_parts)


class QuantizedSlotLayer(SlotLayer):
    """`bits` and `group_size` are how mlx-lm's attention knows a quantized cache."""

    def __init__(self, slots: Slots, keys: tuple, values: tuple, bits: int, group_size: int):
        super().__init__(slots, keys, values)
        self.bits = bits
        self.group_size = group_size


class Slots:
    """The K/V of up to `size` rows for every layer of a model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        template: list[KVCache | QuantizedKVCache],
        size: int,
        window: int | None = None,
    ):
        """`template`: a row's caches (plain or quantized: the slots are of the same kind).
        `window` (--max-kv-size): each row attends to its first KEEP tokens and its latest
        window - KEEP, as mlx-lm's RotatingKVCache(window, keep=KEEP) does; the columns in between
        are masked, then dropped once there are STEP of them."""
        attn = model.layers[0].self_attn
        heads, head_dim = attn.n_kv_heads, attn.head_dim
        embed = model.model.embed_tokens  # K/V come out in the activations' dtype
        # That of a lookup through the first norm, never evaluated: a float-mode (mxfp4...)
        # table has uint8 scales and looks up bfloat16, which float32 norm weights promote.
        dtype = model.layers[0].input_layernorm(embed(mx.zeros((1, 1), mx.int32))).dtype
        self.quantized = isinstance(template[0], QuantizedKVCache)
        self.size = size
        self.end = 0
        self.pads: list[int | None] = [None] * size  # None: a free slot
        self.window = window
        self.dropped = [0] * size  # a windowed row's tokens whose columns are gone
        if self.quantized:  # packed values, then a scale and a bias per group
            bits, group = template[0].bits, template[0].group_size
            widths = [(head_dim * bits // 32, mx.uint32)] + [(head_dim // group, dtype)] * 2
        else:
            widths = [(head_dim, dtype)]

        def empty() -> tuple:
            return tuple(mx.zeros((size, heads, STEP, w), t) for w, t in widths)

        self.layers = [
            QuantizedSlotLayer(self, empty(), empty(), bits, group)
            if self.quantized
            else SlotLayer(self, empty(), empty())
            for _ in template
        ]
        self.positions: mx.array | None = None
        self.row_starts: mx.array | None = None  # None with a window: the mask says more
        self._pads: list[int] = []  # the step's first visible column per slot
        self._mask: mx.array | None = None

    @property
    def capacity(self) -> int:
        return self.layers[0].key_parts[0].shape[2]

    @property
    def free(self) -> list[int]:
        return [s for s, pad in enumerate(self.pads) if pad is None]

    def length(self, slot: int) -> int:
        """Tokens the row has seen (its position)."""
        return self.end - self.pads[slot] + self.dropped[slot]

    def whole(self, slot: int) -> bool:
        """Whether the row's K/V are those of all its tokens with full attention (a prefix store
        entry can then be made of them)."""
        return self.window is None or self.length(slot) <= self.window

    # -- rows come and go ----------------------------------------------------------------------

    def place(self, slot: int, caches: list) -> None:
        """Copy a row's caches (all their tokens) into free `slot`."""
        n = caches[0].offset
        if not n:  # a one-token prompt: nothing cached yet
            self._reserve(self.end + 1)
            self.pads[slot], self.dropped[slot] = self.end, 0
            return
        if n > self.end:
            self._shift(n - self.end)
        self._reserve(self.end + 1)
        start = self.end - n
        for layer, c in zip(self.layers, caches, strict=True):
            mine = layer.key_parts + layer.value_parts
            theirs = _parts(c.keys) + _parts(c.values)
            for stored, new in zip(mine, theirs, strict=True):
                stored[slot : slot + 1, :, start : self.end, :] = new[:, :, :n, :]
        self.pads[slot], self.dropped[slot] = start, 0

    def release(self, slot: int) -> None:
        self.pads[slot], self.dropped[slot] = None, 0
        self._drop_unused()

    def _drop_unused(self) -> None:
        live = [p for p in self.pads if p is not None]
        if live and min(live) >= STEP:  # the longest rows left: drop the columns nobody uses
            drop = min(live) // STEP * STEP
            room = [(0, 0), (0, 0), (0, drop), (0, 0)]  # the same capacity (see GROW_MAX)
            for layer in self.layers:
                layer._map(lambda p: mx.pad(p[..., drop:, :], room))
            self.end -= drop
            self.pads = [None if p is None else p - drop for p in self.pads]

    def extract(self, slot: int, length: int | None = None) -> list:
        """Caches of the row's kind holding the first `length` tokens of `slot` (all of them by
        default)."""
        start = self.pads[slot]
        stop = self.end if length is None else start + length

        def cut(parts: tuple):
            return _whole(
                tuple(mx.contiguous(p[slot : slot + 1, :, start:stop, :]) for p in parts),
                self.quantized,
            )

        out = []
        for layer in self.layers:
            if self.quantized:
                c = QuantizedKVCache(group_size=layer.group_size, bits=layer.bits)
            else:
                c = KVCache()
            c.keys, c.values = cut(layer.key_parts), cut(layer.value_parts)
            c.offset = stop - start
            out.append(c)
        return out

    def resize(self, size: int, order: list[int]) -> list[int]:
        """Move to `size` slots, the rows now in slots `order` first; returns their new slots."""
        index = mx.array(order + [order[0]] * (size - len(order)))  # filler rows are freed below
        for layer in self.layers:
            layer._map(lambda p: mx.take(p, index, axis=0))
        self.pads = [self.pads[s] for s in order] + [None] * (size - len(order))
        self.dropped = [self.dropped[s] for s in order] + [0] * (size - len(order))
        self.size = size
        return list(range(len(order)))

    # -- one decode step -----------------------------------------------------------------------

    def begin_step(self) -> None:
        """Positions, first visible columns and (on demand) the mask for the step that writes
        column `end`, made once for all layers."""
        if self.window is not None:
            self._compact_windows()
        self._reserve(self.end + 1)
        end = self.end
        pads = [end if p is None else p for p in self.pads]  # a free slot sees its own column
        positions = [end - p + d for p, d in zip(pads, self.dropped, strict=True)]
        self.positions = mx.array(positions, dtype=mx.int32)
        self.row_starts = None if self.window is not None else mx.array(pads, dtype=mx.int32)
        self._pads, self._mask = pads, None

    @property
    def mask(self) -> mx.array:
        """(slots, 1, 1, end + 1) bool: the columns each slot's query sees this step."""
        if self._mask is None:
            end, pads = self.end, self._pads
            columns = mx.arange(end + 1)[None, :]
            starts = mx.array(pads)[:, None]
            visible = columns >= starts
            if self.window is not None:
                recent = [max(p + KEEP, end + 1 - (self.window - KEEP)) for p in pads]
                visible &= (columns < starts + KEEP) | (columns >= mx.array(recent)[:, None])
            self._mask = visible[:, None, None, :]
        return self._mask

    def _compact_windows(self) -> None:
        """Drop a windowed row's masked columns once there are STEP of them: its KEEP first
        columns move up next to its recent ones."""
        end = self.end
        for slot, pad in enumerate(self.pads):
            if pad is None:
                continue
            recent = end + 1 - (self.window - KEEP)  # the step's first visible recent column
            if recent - KEEP - pad < STEP:
                continue
            new_pad = recent - KEEP
            for layer in self.layers:
                for part in layer.key_parts + layer.value_parts:
                    part[slot : slot + 1, :, new_pad:recent, :] = part[
                        slot : slot + 1, :, pad : pad + KEEP, :
                    ]
            self.dropped[slot] += new_pad - pad
            self.pads[slot] = new_pad
        self._drop_unused()

    def advance(self) -> None:
        self.end += 1

    # -- room ------------------------------------------------------------------------------------

    def _capacity_for(self, columns: int) -> int:
        """The capacity that holds `columns` columns: this one, or the smallest of STEP x 2^k
        (up to GROW_MAX), then multiples of GROW_MAX, that does (see GROW_MAX)."""
        if columns <= self.capacity:
            return self.capacity
        size = STEP
        while size < columns and size < GROW_MAX:
            size *= 2
        return size if size >= columns else -(-columns // GROW_MAX) * GROW_MAX

    def _reserve(self, columns: int) -> None:
        """At least `columns` columns of capacity."""
        grow = self._capacity_for(columns) - self.capacity
        if grow:
            for layer in self.layers:
                layer._map(lambda p: mx.pad(p, [(0, 0), (0, 0), (0, grow), (0, 0)]))

    def _shift(self, by: int) -> None:
        """Move every row `by` columns right (a longer newcomer is joining), in a capacity of
        the usual sizes: the columns past `end` hold nothing, so they make room."""
        capacity = self._capacity_for(self.end + by + 1)
        kept = min(self.capacity, capacity - by)
        room = [(0, 0), (0, 0), (by, capacity - by - kept), (0, 0)]
        for layer in self.layers:
            layer._map(lambda p: mx.pad(p[..., :kept, :], room))
        self.end += by
        self.pads = [None if p is None else p + by for p in self.pads]

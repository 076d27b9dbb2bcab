"""llama.cpp GGUF files (Qwen3 / Qwen3-MoE) as a converter source: config, names, tensors.

    python -m qwen3_mlx.convert --gguf Qwen3-8B-Q4_K_M.gguf --mlx-path Qwen3-8B-4bit -q

The `gguf` package (llama.cpp's own Python reader) parses the file and dequantizes every type
it knows; this module maps its metadata onto config.json, its tensor names onto ours, and
streams its tensors, one at a time, through the same writer, quantizer and crash-safe
staging the Hugging Face conversion uses. Facts about llama.cpp's layout relied on here:

* numpy shapes from `GGUFReader` are already row-major ((out, in) for a Linear, (experts,
  out, in) for stacked experts): GGUF's reversed `ne` order is undone by the reader;
* llama.cpp permutes Q/K rows for rotary only in its LLaMA-family conversions; Qwen2/3's
  conversion stores q_proj/k_proj as Hugging Face does (checked by round-trip logits in
  tests/test_convert_gguf.py);
* Qwen3-MoE's experts are already stacked per projection, as mlx-lm stores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import ConvertError, WeightsError
from .model import Model

ARCHITECTURES = {"qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
GGUF_MAGIC = b"GGUF"
# Rows dequantized per step: keeps the float32 scratch of a huge tensor (the embedding, an
# expert stack) near 64 MB instead of the whole tensor at 4 bytes per weight.
CHUNK_ELEMENTS = 16 << 20


def model_name(gguf_name: str) -> str | None:
    """Our parameter name for a llama.cpp tensor name, None for one we don't know."""
    if gguf_name.endswith(".weight") and gguf_name[: -len(".weight")] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[gguf_name[: -len('.weight')]]}.weight"
    match = BLOCK_TENSOR.match(gguf_name)
    if match and match[2] in LAYER_NAMES:
        return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.weight"
    return None


class GGUFSource:
    """An opened GGUF file: its fields, its tensors (memory-mapped, read on demand)."""

    def __init__(self, path: str | Path):
        from gguf import GGMLQuantizationType, GGUFReader

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ConvertError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
            raise ConvertError(f"{self.path}: unreadable GGUF file, truncated? ({e})") from None
        self.types = GGMLQuantizationType
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConvertError(
                f"{self.path}: general.architecture is {arch!r}, not a Qwen3 model "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.arch = arch
        for t in self.reader.tensors:  # a short file can still give a header that parses
            if t.data.nbytes != int(t.n_bytes):
                raise ConvertError(
                    f"{self.path}: tensor {t.name} is cut short "
                    f"({t.data.nbytes} of {int(t.n_bytes)} bytes): truncated file?"
                )

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def required(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise ConvertError(f"{self.path}: missing metadata {key}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's logical row-major shape (GGUF stores `ne`, innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def source_types(self) -> list[str]:
        """The distinct tensor types, as llama.cpp names them (F16, Q4_K...)."""
        return sorted({t.tensor_type.name for t in self.reader.tensors})

    def k_quants(self) -> list[str]:
        return [name for name in self.source_types() if name.endswith("_K")]

    def float_dtype(self) -> str:
        """The dtype unquantized output keeps: the source's float type of its matrices."""
        kinds = {t.tensor_type.name for t in self.reader.tensors if len(t.shape) >= 2}
        if "BF16" in kinds:
            return "bfloat16"
        if kinds == {"F32"}:
            return "float32"
        return "float16"  # F16 and every block-quantized type (their scales are fp16)

    # -- config.json -------------------------------------------------------------------------

    def config(self, dtype_name: str, token_ids: dict[str, int]) -> dict[str, Any]:
        """config.json (hub dialect) from the GGUF metadata and tensor shapes."""
        p = f"{self.arch}."
        if "token_embd.weight" not in self.tensors:
            raise WeightsError(f"{self.path}: missing tensor token_embd.weight")
        vocab_size, hidden = self.shape("token_embd.weight")
        heads = int(self.required(p + "attention.head_count"))
        moe = self.arch == "qwen3moe"
        config: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
            "model_type": ARCHITECTURES[self.arch],
            "hidden_size": int(self.required(p + "embedding_length")),
            "num_hidden_layers": int(self.required(p + "block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": _per_layer(self.field(p + "attention.head_count_kv", heads)),
            "head_dim": int(self.field(p + "attention.key_length", hidden // heads)),
            "rms_norm_eps": _f32(self.field(p + "attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(self.field(p + "rope.freq_base", 1_000_000.0)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": int(self.field(p + "context_length", 40960)),
            "vocab_size": vocab_size,
            "intermediate_size": int(self.field(p + "feed_forward_length", 0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": False,
            "torch_dtype": dtype_name,
            **token_ids,
        }
        if moe:
            layers = range(config["num_hidden_layers"])
            config.update(
                num_experts=int(self.required(p + "expert_count")),
                num_experts_per_tok=int(self.required(p + "expert_used_count")),
                moe_intermediate_size=int(self.required(p + "expert_feed_forward_length")),
                # llama.cpp's qwen3moe always renormalizes the top-k weights (newer files
                # say so in expert_weights_norm).
                norm_topk_prob=bool(self.field(p + "expert_weights_norm", True)),
                decoder_sparse_step=1,
                mlp_only_layers=[
                    i for i in layers if f"blk.{i}.ffn_gate_exps.weight" not in self.tensors
                ],
            )
        if config["hidden_size"] != hidden:
            raise WeightsError(
                f"{self.path}: token_embd.weight has width {hidden}, "
                f"but {p}embedding_length is {config['hidden_size']}"
            )
        return config

    def _rope_scaling(self) -> dict[str, Any] | None:
        p = f"{self.arch}.rope.scaling."
        kind = self.field(p + "type")
        if kind in (None, "none"):
            return None
        factor = _f32(self.required(p + "factor"))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            original = int(self.required(p + "original_context_length"))
            return {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original,
            }
        raise ConvertError(f"{self.path}: {p}type {kind!r} is not supported (yarn, linear)")

    # -- tensors -----------------------------------------------------------------------------

    def check_against(self, model: Model) -> None:
        """Every tensor known, of the shape the config implies, of a type we can read;
        nothing missing. Runs before anything is written."""
        expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        seen = set()
        for name, tensor in self.tensors.items():
            ours = model_name(name)
            if ours is None or ours not in expected:
                if ours == "lm_head.weight":
                    continue  # tied in config but stored anyway: sanitize drops it too
                raise WeightsError(f"{self.path}: unexpected tensor {name}")
            if self.shape(name) != expected[ours]:
                raise WeightsError(
                    f"{self.path}: tensor {name} has shape {self.shape(name)}, "
                    f"the metadata implies {expected[ours]}"
                )
            self._check_readable(tensor)
            seen.add(ours)
        missing = [k for k in expected if k not in seen]
        if missing:
            raise WeightsError(
                f"{self.path}: missing tensor for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def _check_readable(self, tensor) -> None:
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        kind = tensor.tensor_type
        if kind in (self.types.F32, self.types.F16, self.types.BF16):
            return
        _, type_size = GGML_QUANT_SIZES[kind]
        try:  # one block through the reference dequantizer says whether it knows the type
            dequantize(np.asarray(tensor.data).reshape(-1)[:type_size], kind)
        except NotImplementedError:
            raise ConvertError(
                f"{self.path}: tensor {tensor.name} is {kind.name}, which the gguf package "
                "cannot dequantize"
            ) from None

    def model_tensors(self, dtype: mx.Dtype, tied: bool) -> Iterator[tuple[str, mx.array, int]]:
        """Yield (our name, float tensor, source bytes), one tensor in memory at a time."""
        for tensor in self.reader.tensors:
            name = model_name(tensor.name)
            if name == "lm_head.weight" and tied:
                yield "", mx.array([]), int(tensor.n_bytes)  # progress only
                continue
            yield name, self.read(tensor.name, dtype), int(tensor.n_bytes)

    def read(self, name: str, dtype: mx.Dtype) -> mx.array:
        """One tensor, dequantized to `dtype` (float types are copied exactly)."""
        from gguf.quants import dequantize

        tensor, shape = self.tensors[name], self.shape(name)
        kind = tensor.tensor_type
        if kind == self.types.BF16:  # numpy has no bfloat16: move the raw bits
            bits = np.asarray(tensor.data).view(np.uint16).reshape(shape)
            return mx.array(bits).view(mx.bfloat16).astype(dtype)
        if kind in (self.types.F32, self.types.F16):
            return mx.array(np.asarray(tensor.data).reshape(shape)).astype(dtype)
        data = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])
        rows = data.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(1, int(tensor.n_elements) // rows))
        scratch = np.float32 if dtype == mx.bfloat16 else _NUMPY_DTYPES[dtype]
        out = np.empty((rows, int(tensor.n_elements) // rows), dtype=scratch)
        for start in range(0, rows, step):
            out[start : start + step] = dequantize(data[start : start + step], kind)
        return mx.array(out.reshape(shape)).astype(dtype)


_NUMPY_DTYPES = {mx.float16: np.float16, mx.float32: np.float32}


def _f32(value: Any) -> float:
    """GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07. The shortest decimal
    that rounds to the same float32 is what the source config said."""
    return float(str(np.float32(value)))


def _per_layer(value: Any) -> int:
    """head_count_kv is a number, or a per-layer list in files of hybrid models."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ConvertError(f"per-layer kv head counts {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def convert_gguf(
    gguf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    q_mode: str = "affine",
    dtype: str | None = None,
    quant_recipe: str | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> Path:
    """Convert a llama.cpp Qwen3 / Qwen3-MoE GGUF file into an MLX checkpoint at `mlx_path`.

    The flags mean what they mean for `convert.convert`; without `-q` the weights stay float
    (block-quantized tensors dequantized to float16, or `dtype`).
    """
    from . import quant
    from .config import ModelArgs
    from .convert_cli import parse_size
    from .convert_output import check_destination, output_config, staged_output
    from .convert_plan import DTYPES
    from .convert_stream import ShardWriter, write_tensors
    from .gguf_tokenizer import write_tokenizer

    dst = Path(mlx_path).expanduser()
    if quant_recipe is not None:
        quantize = True
    if quantize:
        bits, group_size, recipe = quant.validate_settings(
            q_bits, q_group_size, q_mode, quant_recipe
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size

    source = GGUFSource(gguf_path)
    src = source.path
    check_destination(dst, src, force)
    dtype_name = dtype or source.float_dtype()
    # The token ids config.json carries come from the tokenizer, written inside the staging
    # directory; this config without them serves the checks made before any write.
    config = source.config(dtype_name, {})
    args = ModelArgs.from_dict(config, f"{src} (metadata)")
    model = Model(args)  # parameters stay lazy: only names and shapes are used
    source.check_against(model)

    settings, quantization = {}, None
    if quantize:
        settings, quantization = quant.plan_quantization(model, bits, group_size, recipe, q_mode)
    total_bytes = sum(int(t.n_bytes) for t in source.reader.tensors)
    what = f"quantized: {quant.describe(settings)}" if quantize else f"float ({dtype_name})"
    print(
        f"[INFO] {src} -> {dst}: GGUF {source.arch}, {total_bytes / 2**30:.2f} GiB "
        f"({', '.join(source.source_types())}), {what}",
        flush=True,
    )
    if source.k_quants():
        fate = "requantized (the two rounding errors add up)" if quantize else "kept as float"
        print(
            f"[INFO] source has K-quants ({', '.join(source.k_quants())}): dequantized and {fate}",
            flush=True,
        )
    with staged_output(dst, src) as tmp:
        token_ids = write_tokenizer(source.field, src, tmp)
        config = source.config(dtype_name, token_ids)
        writer = ShardWriter(tmp, max_bytes)
        parameters = write_tensors(
            source.model_tensors(DTYPES[dtype_name], tied=args.tie_word_embeddings),
            writer,
            dtype=None,  # model_tensors already made every tensor `dtype_name`
            settings=settings,
            total_bytes=total_bytes,
            progress=progress,
        )
        writer.finish()
        out_config = output_config(config, dtype_name, quantization)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=4) + "\n")
    bpw = 8 * writer.total_bytes / max(parameters, 1)
    print(
        f"[INFO] Wrote {dst}: {len(writer.shards)} shard(s), "
        f"{writer.total_bytes / 2**30:.2f} GiB, {bpw:.3f} bits per weight",
        flush=True,
    )
    return dst

"""GGUF and Ollama import: llama.cpp-style files written from tiny checkpoints, then converted.

The files are written as llama.cpp's convert_hf_to_gguf.py writes Qwen3 / Qwen3-MoE: its
metadata keys, its tensor names (an independent table here, not the importer's), norms and
the router in F32, experts stacked, no Q/K permutation, the tokenizer padded with [PADn].
"""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from qwen3_mlx.config import normalize_config  # noqa: E402
from qwen3_mlx.convert import main  # noqa: E402
from qwen3_mlx.gguf_import import convert_gguf  # noqa: E402
from qwen3_mlx.loading import load_model  # noqa: E402
from qwen3_mlx.tokenizer import load_tokenizer  # noqa: E402
from tests.checkpoints import YARN, make_checkpoint  # noqa: E402

IDS = mx.array(np.random.default_rng(0).integers(0, 509, (2, 24)))
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
TEXT = "Hello, world! 你好，世界。Grüße 🎉👩‍💻 def f(x):\n    return x**2  # 12345\n"


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks (gguf's Python package can't make K-quants): the inverse of its
    reference dequantizer's layout, scales rounded simply (not llama.cpp's search)."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    sub = blocks.reshape(-1, 16, 16)
    sub_scale = np.abs(sub).max(-1) / 31
    d = (sub_scale.max(-1) / 127).astype(np.float16)
    safe_d = np.where(d == 0, 1, d).astype(np.float32)[:, None]
    scales = np.clip(np.round(sub_scale / safe_d), -128, 127).astype(np.int8)
    step = (safe_d * np.where(scales == 0, 1, scales))[..., None]
    q = (np.clip(np.round(sub / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    lo, hi = q & 0xF, q >> 4
    ql = (lo[..., :64] | (lo[..., 64:] << 4)).reshape(-1, 128)
    qh = hi[..., 0:32] | hi[..., 32:64] << 2 | hi[..., 64:96] << 4 | hi[..., 96:] << 6
    raw = [ql, qh.reshape(-1, 64), scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)]
    return np.concatenate(raw, axis=1).reshape(*x.shape[:-1], -1)


def encode(array: np.ndarray, qtype: T, name: str):
    """(data, raw_dtype) the way llama.cpp picks them: 1-D tensors and the router in F32,
    rows the block size doesn't divide in F16."""
    if array.ndim == 1 or "ffn_gate_inp" in name or qtype == T.F32:
        return array.astype(np.float32), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == T.F16 or array.shape[-1] % block:
        return array.astype(np.float16), None
    if qtype == T.Q6_K:
        return quantize_q6_k(array), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def hf_tokenizer_metadata(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """llama.cpp's _set_vocab_gpt2 over a Hugging Face tokenizer directory."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {a["id"]: a for a in data["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            content = added[i]["content"]
            special = added[i]["special"] or re.fullmatch(r"<\|.*\|>", content)
            tokens.append(content)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index(config["eos_token"]))
    writer.add_pad_token_id(tokens.index(config["pad_token"]))
    writer.add_add_bos_token(False)
    if "chat_template" in config:
        writer.add_chat_template(config["chat_template"])


def tiny_tokenizer_metadata(writer, vocab_size: int) -> None:
    """A small byte-level BPE for the tiny checkpoints: 256 bytes, letter pairs, 3 specials."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters][: vocab_size - len(alphabet) - 8]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + [a + b for a, b in pairs] + specials
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 3) + [gguf.TokenType.CONTROL] * 3
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in pairs])
    writer.add_eos_token_id(tokens.index("<|im_end|>"))


def write_gguf(src: Path, path: Path, qtype: T, tokenizer_dir: Path | None = None) -> Path:
    """A llama.cpp-style GGUF of the checkpoint at `src`."""
    config = normalize_config(json.loads((src / "config.json").read_text()))
    moe = config["model_type"] == "qwen3_moe"
    weights = {}
    for shard in sorted(src.glob("*.safetensors")):
        weights.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(shard)).items()})
    arch = "qwen3moe" if moe else "qwen3"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta", 1_000_000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if scaling := config.get("rope_scaling"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    if moe:
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_dir is not None:
        hf_tokenizer_metadata(writer, tokenizer_dir, config["vocab_size"])
    else:
        tiny_tokenizer_metadata(writer, config["vocab_size"])

    def add(name, array):
        data, raw = encode(array, qtype, name)
        writer.add_tensor(name, data, raw_dtype=raw)

    for name, key in GLOBAL.items():
        if f"{name}.weight" in weights:
            add(f"{key}.weight", weights.pop(f"{name}.weight"))
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for hf, key in HF_TO_GGUF.items():
            if f"{prefix}{hf}.weight" in weights:
                add(f"blk.{i}.{key}.weight", weights.pop(f"{prefix}{hf}.weight"))
        for proj, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            experts = [f"{prefix}mlp.experts.{e}.{proj}.weight" for e in range(8)]
            if experts[0] in weights:
                stacked = np.stack([weights.pop(e) for e in experts if e in weights])
                add(f"blk.{i}.ffn_{key}_exps.weight", stacked)
    assert not weights, f"unmapped tensors: {sorted(weights)}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-sources")
    fixtures = {
        "dense": dict(),
        "yarn": dict(rope_scaling=YARN),
        "moe": dict(moe=True, hub_dialect=True),
        # every row a multiple of 256, so K-quant blocks fit
        "dense256": dict(hidden_size=256, intermediate_size=512, head_dim=64),
    }
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_checkpoint(root / name, **fixtures[name])
        return made[name]

    return get


def logits(model):
    return np.array(model(IDS))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).mean() / np.abs(reference).mean())


def round_tripped(src: Path, out: Path, qtype: T, dtype: str) -> Path:
    """`src` with every tensor quantized to `qtype` and back, as the GGUF stores it: the
    logits an exact import must give, quantization error included."""
    out.mkdir()
    shutil.copy(src / "config.json", out)
    for shard in src.glob("*.safetensors"):
        tensors = {}
        for name, value in mx.load(str(shard)).items():
            router = "ffn_gate_inp" if name.endswith("mlp.gate.weight") else name
            data, raw = encode(np.array(value.astype(mx.float32)), qtype, router)
            if raw is not None:
                data = gguf.quants.dequantize(data, raw)
            tensors[name] = mx.array(data.astype(np.float32)).astype(getattr(mx, dtype))
        mx.save_safetensors(str(out / shard.name), tensors)
    return out


@pytest.mark.parametrize(
    "fixture, qtype, tolerance",
    [("yarn", T.F16, 5e-3), ("dense", T.Q8_0, 5e-2), ("dense", T.Q4_0, 0.5)]
    + [("moe", T.Q8_0, 5e-2), ("dense256", T.Q6_K, 0.15)],
)
def test_import_matches_source(sources, tmp_path, fixture, qtype, tolerance, capsys):
    src = sources(fixture)
    path = write_gguf(src, tmp_path / f"{fixture}-{qtype.name}.gguf", qtype)
    # MLX's CPU gather_mm (MoE experts) computes in float32 only.
    dtype = "float32" if fixture == "moe" else None
    dst = convert_gguf(path, tmp_path / "out", dtype=dtype, progress=False)
    ours = logits(load_model(dst)[0])
    # Exact up to float rounding against the same quantization error in the source...
    exact = round_tripped(src, tmp_path / "exact", qtype, dtype or "float16")
    assert relative_error(ours, logits(load_model(exact)[0])) < 1e-3
    # ...and within the quantization's error of the source itself.
    assert relative_error(ours, logits(load_model(src)[0])) < tolerance

    config = json.loads((dst / "config.json").read_text())
    source = normalize_config(json.loads((src / "config.json").read_text()))
    for key in ("hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert config[key] == source[key], key
    assert config["rope_scaling"] == source.get("rope_scaling")
    assert config["torch_dtype"] == (dtype or "float16") and "quantization" not in config
    if fixture == "moe":
        assert config["num_experts"] == 8 and config["norm_topk_prob"] is True
    k_quant_line = "K-quants (Q6_K): dequantized and kept as float"
    assert (k_quant_line in capsys.readouterr().out) == (qtype == T.Q6_K)


@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_quantized_import_takes_the_hf_path(sources, tmp_path, fixture):
    """-q on an F32 GGUF writes what -q on the HF checkpoint writes, bit for bit (router at
    8 bits): one quantization path for both sources."""
    from qwen3_mlx.convert import convert

    src = sources(fixture)
    path = write_gguf(src, tmp_path / "f32.gguf", T.F32)
    ours = convert_gguf(path, tmp_path / "q4", quantize=True, progress=False)
    hf = convert(src, tmp_path / "hf-q4", quantize=True, progress=False)
    ours_q = json.loads((ours / "config.json").read_text())["quantization"]
    assert ours_q == json.loads((hf / "config.json").read_text())["quantization"]
    if fixture == "moe":
        assert ours_q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    a, b = all_tensors(ours), all_tensors(hf)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item(), name
    assert np.array_equal(logits(load_model(ours)[0]), logits(load_model(hf)[0]))


def all_tensors(model_dir: Path) -> dict:
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        tensors.update(mx.load(str(path)))
    return tensors


def test_real_vocabulary_tokenizer_round_trip(tmp_path, qwen3_tokenizer_dir):
    from tests.checkpoints import CHAT_TEMPLATE
    from tests.conftest import write_tiny_qwen3

    src = write_tiny_qwen3(tmp_path / "src")
    tok_dir = tmp_path / "tok"
    shutil.copytree(qwen3_tokenizer_dir, tok_dir)
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({**tok_config, "chat_template": CHAT_TEMPLATE})
    )
    path = write_gguf(src, tmp_path / "real.gguf", T.F16, tokenizer_dir=tok_dir)
    dst = convert_gguf(path, tmp_path / "out", progress=False)

    ours, theirs = load_tokenizer(dst), load_tokenizer(qwen3_tokenizer_dir)
    for text in (TEXT, "<|im_start|>user\n<think>x</think><|im_end|>", " 2025 年 ‽ \t\n\n"):
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == text
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.eos_token == "<|im_end|>" and ours.im_end_id in ours.eos_token_ids
    assert ours.think_start_id == theirs.think_start_id
    assert json.loads((dst / "config.json").read_text())["vocab_size"] == 151936
    assert relative_error(logits(load_model(dst)[0]), logits(load_model(src)[0])) < 5e-3


def test_ollama_store(sources, tmp_path, monkeypatch, capsys):
    blob = write_gguf(sources("dense"), tmp_path / "model.gguf", T.Q8_0)
    store = tmp_path / "ollama"
    digest = "sha256:" + "ab" * 32
    (store / "blobs").mkdir(parents=True)
    shutil.move(blob, store / "blobs" / digest.replace(":", "-"))
    manifest = store / "manifests/registry.ollama.ai/library/tiny-qwen3/latest"
    manifest.parent.mkdir(parents=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    shutil.copy(manifest, manifest.with_name("q8"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))

    for name in ("tiny-qwen3", "tiny-qwen3:q8"):
        out = tmp_path / name.replace(":", "-")
        assert main(["--ollama", name, "--mlx-path", str(out), "--no-progress"]) == 0
        load_model(out)
    assert main(["--ollama", "qwen3:235b", "--mlx-path", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--ollama qwen3:235b: not found in" in err and "library/qwen3/235b" in err
    assert not (tmp_path / "x").exists()


def test_bad_files(sources, tmp_path, capsys):
    good = write_gguf(sources("dense"), tmp_path / "good.gguf", T.Q8_0)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:2000])
    llama = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(llama), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = {
        not_gguf: "not a GGUF file",
        truncated: "truncated",
        header_only: "truncated",
        llama: "general.architecture is 'llama', not a Qwen3 model",
        tmp_path / "absent.gguf": "no such GGUF file",
    }
    for path, message in cases.items():
        out = tmp_path / f"out-{path.stem}"
        assert main(["--gguf", str(path), "--mlx-path", str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

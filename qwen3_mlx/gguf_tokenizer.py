"""A GGUF file's tokenizer metadata → tokenizer.json + tokenizer_config.json.

llama.cpp stores Qwen's byte-level BPE as its vocabulary (`tokenizer.ggml.tokens`, already in
the byte-to-unicode alphabet Hugging Face uses), its merges ("a b" strings), a type per token
and the pre-tokenizer's name (`qwen2`). That is everything `tokenizers` needs to rebuild the
same BPE; the regex and byte-level stages are Qwen2's, as in Qwen's own tokenizer.json.

Token types: CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens
(`<think>`, `<tool_call>`), UNUSED ones (llama.cpp's `[PAD151669]` fillers up to the
embedding's row count) are left out. llama.cpp marks every `<|...|>` token CONTROL, so the
FIM and repo markers come back special, where Qwen's file has them plain: encodings are
identical; only `skip_special_tokens` decoding differs for those few.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConvertError

# Qwen2/Qwen3's pre-tokenizer (llama.cpp's `qwen2`): GPT-4's, but digits one by one.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_OPTIONS = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

Field = Callable[[str, Any], Any]


def build_tokenizer(field: Field, source: Path):
    """A `tokenizers.Tokenizer` equal to the one the GGUF metadata describes."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        models,
    )

    kind = field("tokenizer.ggml.model", None)
    if kind is None:
        raise ConvertError(f"{source}: no tokenizer in the file (tokenizer.ggml.model missing)")
    if kind != "gpt2":
        raise ConvertError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    tokens = field("tokenizer.ggml.tokens", None)
    merges = field("tokenizer.ggml.merges", None)
    if not tokens or merges is None:
        raise ConvertError(f"{source}: the tokenizer's tokens or merges are missing")
    types = field("tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConvertError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == UNUSED:
            continue
        # Added tokens stay in the model's vocabulary too, so adding them keeps their ids.
        vocab[token] = i
        if kind in (CONTROL, USER_DEFINED):
            added.append((token, kind == CONTROL))
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=False, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    set_qwen2_pipeline(tokenizer)
    for content, special in added:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    return tokenizer, tokens, types


def set_qwen2_pipeline(tokenizer) -> None:
    """Qwen2's byte-level BPE pipeline around a `tokenizers.Tokenizer`'s BPE model: NFC, its split
    regex, byte-level pre-tokenizer, post-processor and decoder (the hub's Qwen3 settings)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(**BYTE_LEVEL_OPTIONS),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(**BYTE_LEVEL_OPTIONS)
    tokenizer.decoder = decoders.ByteLevel()


def write_tokenizer(field: Field, source: Path, out_dir: Path) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; return config.json's token ids."""
    pre = field("tokenizer.ggml.pre", None)
    if pre not in (None, "qwen2"):
        print(f"[WARN] {source}: tokenizer.ggml.pre is {pre!r}; using Qwen2's pre-tokenizer")
    tokenizer, tokens, types = build_tokenizer(field, source)
    data = json.loads(tokenizer.to_str())
    # The Python binding drops the decoder's options; Qwen's file spells them out.
    data["decoder"] = {"type": "ByteLevel", **BYTE_LEVEL_OPTIONS}
    with open(out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)

    def token(key: str) -> tuple[int | None, str | None]:
        i = field(f"tokenizer.ggml.{key}_token_id", None)
        if i is None or not 0 <= int(i) < len(tokens):
            return None, None
        return int(i), tokens[int(i)]

    (bos_id, bos), (eos_id, eos), (_, pad) = token("bos"), token("eos"), token("padding")
    add_bos = bool(field("tokenizer.ggml.add_bos_token", False))
    config = {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": kind == CONTROL,
            }
            for i, kind in enumerate(types)
            if kind in (CONTROL, USER_DEFINED)
        },
        "bos_token": bos if add_bos else None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    template = field("tokenizer.chat_template", None)
    if isinstance(template, str):
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    return {k: v for k, v in ids.items() if v is not None}

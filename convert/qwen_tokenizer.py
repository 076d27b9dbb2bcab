"""Build a Qwen3 tokenizer directory from the public Qwen vocabulary.

Real checkpoints can't be downloaded here, but the `dashscope` wheel ships
`qwen.tiktoken`: the 151,643 byte-level BPE ranks every Qwen model uses. This
script turns those ranks into the files a Qwen3 checkpoint carries:

    tokenizer.json         the `tokenizers` model: NFC normalizer, Qwen's split
                           regex, byte-level BPE, and the 26 added tokens
                           151643-151668 with the same `special` flags as Qwen3
    tokenizer_config.json  eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and
                           (only when asked) a chat template

The layout mirrors the hub's Qwen3 files, so `transformers.AutoTokenizer`,
`mlx_lm` and `qwen3_mlx.tokenizer` load the directory like a real checkpoint's.
Building takes a few seconds, so the result is cached under
~/.cache/qwen3_mlx/tokenizers/ keyed by the vocabulary file's hash.

    python -m convert.qwen_tokenizer OUT_DIR [--chat-template FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Repository root on the path so `python convert/qwen_tokenizer.py` finds qwen3_mlx too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3_mlx.errors import Qwen3MLXError, TokenizerError  # noqa: E402

# Qwen's pre-tokenizer: like GPT-4's, but digits are split one by one (\p{N}, not \p{N}{1,3}).
# One copy, shared with the GGUF import (llama.cpp's `qwen2` pre-tokenizer).
from qwen3_mlx.gguf_tokenizer import QWEN2_SPLIT_PATTERN as QWEN_SPLIT_PATTERN  # noqa: E402
from qwen3_mlx.gguf_tokenizer import set_qwen2_pipeline  # noqa: E402

FIRST_ADDED_ID = 151643

# (token, special) in id order from 151643, as in Qwen3's tokenizer_config.json. Only the
# control tokens up to <|video_pad|> are special; the tool, FIM and think markers are
# plain added tokens, so decoding with skip_special_tokens=True keeps them as text.
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]

# Byte-level stages exactly as Qwen's tokenizer.json spells them.
_BYTE_LEVEL_OPTIONS = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}

# Bump when the produced files change, so stale caches are rebuilt.
BUILD_VERSION = "2"


def find_qwen_tiktoken() -> Path:
    """Locate dashscope's qwen.tiktoken without importing dashscope (its import needs aiohttp)."""
    override = os.environ.get("QWEN_TIKTOKEN")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("dashscope")
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerError(
                "qwen.tiktoken not found: install it with `pip install --no-deps dashscope` "
                "or point QWEN_TIKTOKEN at the file"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"{path}: qwen.tiktoken is missing")
    return path


def _build_tokenizer_json(tiktoken_file: Path):
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=QWEN_SPLIT_PATTERN
    ).converted()
    base_size = tokenizer.get_vocab_size()
    if base_size != FIRST_ADDED_ID:
        raise TokenizerError(
            f"{tiktoken_file}: expected {FIRST_ADDED_ID} ranks, found {base_size} (not Qwen's vocabulary?)"
        )
    # Settings of the hub's Qwen3 tokenizer.json. NFC and full merge replay (ignore_merges
    # off) were checked to give the same ids as tiktoken on every vocabulary entry.
    tokenizer.model.ignore_merges = False
    set_qwen2_pipeline(tokenizer)
    # Added one by one so each gets the next id, in Qwen3's order.
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        if tokenizer.token_to_id(content) != FIRST_ADDED_ID + offset:
            raise TokenizerError(
                f"{tiktoken_file}: {content} did not get id {FIRST_ADDED_ID + offset}"
            )
    return tokenizer


def _tokenizer_config(chat_template: str | None) -> dict:
    added = {
        str(FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _cache_root() -> Path:
    base = os.environ.get("QWEN3_MLX_CACHE") or Path.home() / ".cache" / "qwen3_mlx"
    return Path(base) / "tokenizers"


def cached_qwen3_tokenizer(tiktoken_file: str | Path | None = None) -> Path:
    """The cached tokenizer directory (no chat template), built on first use."""
    source = Path(tiktoken_file) if tiktoken_file else find_qwen_tiktoken()
    if not source.is_file():
        raise TokenizerError(f"{source}: qwen.tiktoken is missing")
    digest = hashlib.sha256(source.read_bytes() + BUILD_VERSION.encode()).hexdigest()[:16]
    target = _cache_root() / f"qwen3-{digest}"
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent build or a crash never leaves a
    # half-written directory where readers look.
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    staging.chmod(0o755)
    try:
        tokenizer = json.loads(_build_tokenizer_json(source).to_str())
        # The Python binding drops the decoder's options; the hub file spells them out.
        tokenizer["decoder"] = {"type": "ByteLevel", **_BYTE_LEVEL_OPTIONS}
        with open(staging / "tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(tokenizer, f, ensure_ascii=False)
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(None))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_qwen3_tokenizer(
    out_dir: str | Path | None = None,
    *,
    chat_template: str | None = None,
    tiktoken_file: str | Path | None = None,
) -> Path:
    """Write Qwen3's tokenizer files into `out_dir` and return it.

    With `out_dir=None` the shared cache directory itself is returned (treat it as
    read-only). `chat_template` (a jinja string) is embedded in tokenizer_config.json
    when given; by default there is none, like a checkpoint that lacks one.
    """
    cached = cached_qwen3_tokenizer(tiktoken_file)
    if out_dir is None:
        if chat_template is not None:
            raise TokenizerError(
                "chat_template needs an out_dir: the shared cache stays template-free"
            )
        return cached
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached / "tokenizer.json", out / "tokenizer.json")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(chat_template))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a Qwen3 tokenizer.json + tokenizer_config.json built from qwen.tiktoken."
    )
    parser.add_argument("out_dir", help="directory to write the tokenizer files into")
    parser.add_argument(
        "--chat-template", metavar="FILE", help="jinja file to embed as chat_template"
    )
    parser.add_argument(
        "--tiktoken", metavar="FILE", help="qwen.tiktoken (default: dashscope's copy)"
    )
    args = parser.parse_args(argv)
    try:
        template = None
        if args.chat_template:
            try:
                template = Path(args.chat_template).read_text(encoding="utf-8")
            except OSError as e:
                raise TokenizerError(
                    f"{args.chat_template}: cannot read chat template ({e.strerror})"
                ) from e
        out = build_qwen3_tokenizer(
            args.out_dir, chat_template=template, tiktoken_file=args.tiktoken
        )
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizer: equal to tiktoken on Qwen's ranks, Qwen3's added tokens, eos/template discovery,
and a streaming detokenizer whose output always equals a full decode."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from convert.qwen_tokenizer import (
    FIRST_ADDED_ID,
    QWEN3_ADDED_TOKENS,
    QWEN_SPLIT_PATTERN,
    build_qwen3_tokenizer,
    find_qwen_tiktoken,
    main,
)
from qwen3_mlx.errors import TokenizerError
from qwen3_mlx.tokenizer import load_tokenizer

CORPUS = [
    "Hello, world! How's it going? I'm fine, we'll see.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요, 반갑습니다!",
    "ภาษาไทยเป็นภาษาที่ไม่มีการเว้นวรรคระหว่างคำ",
    "हिन्दी एक भारतीय भाषा है। नमस्ते दुनिया",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 ❤️‍🔥 🧑🏿‍💻",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'const x = {"a": [1, 2, 3]}; // comment\n\tif (x.a.length >= 3) { console.log(`ok ${x}`); }',
    "    leading spaces\n\n\n\ttabs\t\there   trailing   \r\n\r\nwindows lines\n",
    "numbers 1234567890 3.14159 1e-9 ١٢٣ ๑๒๓",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|endoftext|><|fim_prefix|>',
    "mixed: Hello 世界 мир 🌍 عالم!!! ...   \n\n",
    "A" * 300 + " " + "zz" * 100,
]

_ALPHABET = list(
    "abcXYZ 019\n\t\r'.,;:!?-_()[]{}<>/\\\"#@$%^&*=+~`|"
    "你好世界日本語カナ한국어ไทยहिंदीعربيкириллица"
    "éüßñø😀👍🏽👨‍👩‍👧🇫🇷"
)


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.2:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(QWEN3_ADDED_TOKENS)[0])
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    specials = {token: FIRST_ADDED_ID + i for i, (token, _) in enumerate(QWEN3_ADDED_TOKENS)}
    return tiktoken.Encoding(
        "qwen3",
        pat_str=QWEN_SPLIT_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(find_qwen_tiktoken())),
        special_tokens=specials,
    )


def test_encoding_equals_tiktoken_on_multilingual_corpus(qwen3_tokenizer, tiktoken_encoding):
    for text in CORPUS + _random_texts(500, seed=1):
        assert qwen3_tokenizer.encode(text) == tiktoken_encoding.encode(
            text, allowed_special="all"
        ), text


def test_decode_round_trips(qwen3_tokenizer):
    for text in CORPUS:
        assert qwen3_tokenizer.decode(qwen3_tokenizer.encode(text)) == text


def test_text_is_nfc_normalized_like_qwen3(qwen3_tokenizer):
    # The hub tokenizer.json has an NFC normalizer: a decomposed é encodes as the composed one.
    assert qwen3_tokenizer.encode("cafe\u0301") == qwen3_tokenizer.encode("caf\u00e9")


def test_added_tokens_ids_and_special_flags(qwen3_tokenizer):
    tok = qwen3_tokenizer
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.token_to_id(content) == FIRST_ADDED_ID + i
        assert tok.encode(content) == [FIRST_ADDED_ID + i]
    assert tok.vocab_size == 151669
    assert tok.im_end_id == 151645
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert (tok.tool_call_start_id, tok.tool_call_end_id) == (151657, 151658)
    assert tok.special_token_ids == frozenset(range(151643, 151657))
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|><|endoftext|>")
    # skip_special_tokens drops the control tokens but keeps think/tool markers as text.
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"
    assert tok.token_to_id("<not a token>") is None


def test_tokenizer_config_matches_qwen3(qwen3_tokenizer_dir):
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert "chat_template" not in config
    flags = {v["content"]: v["special"] for v in config["added_tokens_decoder"].values()}
    assert flags == dict(QWEN3_ADDED_TOKENS)


def _copy_tokenizer(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_eos_ids_merge_config_files(qwen3_tokenizer_dir, tmp_path):
    assert load_tokenizer(qwen3_tokenizer_dir).eos_token_ids == {151645}
    d = _copy_tokenizer(qwen3_tokenizer_dir, tmp_path / "ckpt")
    (d / "config.json").write_text(json.dumps({"eos_token_id": 151645}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert load_tokenizer(d).eos_token_ids == {151645, 151643}


def test_chat_template_sources(qwen3_tokenizer_dir, tmp_path):
    built = build_qwen3_tokenizer(tmp_path / "embedded", chat_template="{{ 'T1' }}")
    assert load_tokenizer(built).chat_template == "{{ 'T1' }}"
    assert load_tokenizer(qwen3_tokenizer_dir).chat_template is None
    # transformers >= 4.43 may save the template beside the config instead.
    d = _copy_tokenizer(qwen3_tokenizer_dir, tmp_path / "jinja")
    (d / "chat_template.jinja").write_text("{{ 'T2' }}")
    assert load_tokenizer(d).chat_template == "{{ 'T2' }}"


def test_missing_or_corrupt_files_raise_tokenizer_error(qwen3_tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    d = _copy_tokenizer(qwen3_tokenizer_dir, tmp_path / "badconfig")
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(d)


def test_builder_cli_reports_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--tiktoken", str(tmp_path / "missing.tiktoken")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.tiktoken" in err and err.count("\n") == 1


# -- streaming detokenizer -------------------------------------------------------------


def _stream(tok, ids, skip_special_tokens=False):
    detok = tok.detokenizer(skip_special_tokens)
    deltas = [detok.add_token(i) for i in ids]
    return deltas, detok


def test_streaming_equals_full_decode_for_every_prefix(qwen3_tokenizer):
    tok = qwen3_tokenizer
    for text in CORPUS + _random_texts(200, seed=2):
        ids = tok.encode(text)
        deltas, detok = _stream(tok, ids)
        emitted = ""
        for k, delta in enumerate(deltas, start=1):
            # Valid text never shows a replacement character mid-stream...
            assert "\ufffd" not in delta, (text, k)
            emitted += delta
            # ...and what is out so far is the full decode of the prefix minus at most
            # one unfinished character (which a full decode renders as U+FFFD).
            full = tok.decode(ids[:k])
            assert full.startswith(emitted), (text, k)
            assert full[len(emitted) :] in ("", "\ufffd"), (text, k)
        assert emitted + detok.finalize() == text
        assert detok.text == text and detok.tokens == ids


def test_streaming_prefix_flush_equals_decode(qwen3_tokenizer):
    tok = qwen3_tokenizer
    ids = tok.encode(CORPUS[1] + CORPUS[8] + CORPUS[4])
    for k in range(len(ids) + 1):
        deltas, detok = _stream(tok, ids[:k])
        assert "".join(deltas) + detok.finalize() == tok.decode(ids[:k])


def test_streaming_equals_decode_on_arbitrary_ids(qwen3_tokenizer):
    # Random ids (broken UTF-8, specials, ids past the vocabulary like the embedding's
    # padding rows) must still match what a full decode renders.
    tok = qwen3_tokenizer
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(0, 151936) for _ in range(rng.randint(1, 12))]
        ids += [rng.randrange(FIRST_ADDED_ID, 151669) for _ in range(rng.randint(0, 2))]
        rng.shuffle(ids)
        for skip in (False, True):
            deltas, detok = _stream(tok, ids, skip)
            assert "".join(deltas) + detok.finalize() == tok.decode(ids, skip_special_tokens=skip)


def test_multibyte_character_is_held_until_complete(qwen3_tokenizer):
    tok = qwen3_tokenizer
    # A rare CJK character that byte-level BPE splits into several tokens.
    ids = tok.encode("𠀋")
    assert len(ids) > 1
    deltas, detok = _stream(tok, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "𠀋"
    assert detok.finalize() == ""


def test_hf_tokenizer_matches(qwen3_tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = qwen3_tokenizer.hf_tokenizer()
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert hf.eos_token_id == 151645
    assert hf.encode(CORPUS[13], add_special_tokens=False) == qwen3_tokenizer.encode(CORPUS[13])
    assert qwen3_tokenizer.hf_tokenizer() is hf


def test_transformers_autotokenizer_loads_the_directory(qwen3_tokenizer, qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == qwen3_tokenizer.encode(text)


@pytest.mark.slow
def test_mlx_lm_loads_the_directory(qwen3_tokenizer, qwen3_tokenizer_dir):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load

    wrapper = load(qwen3_tokenizer_dir)
    assert isinstance(wrapper.detokenizer, BPEStreamingDetokenizer)
    assert wrapper.encode(CORPUS[1], add_special_tokens=False) == qwen3_tokenizer.encode(CORPUS[1])
    assert 151645 in wrapper.eos_token_ids

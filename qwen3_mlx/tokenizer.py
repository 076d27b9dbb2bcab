"""The checkpoint's tokenizer, and a streaming detokenizer that never splits a character.

Encoding and full decoding are Hugging Face `tokenizers` reading the checkpoint's
tokenizer.json; nothing here re-implements BPE. What this module adds:

- the ids generation needs (end-of-turn ids, the think and tool-call markers),
  gathered from tokenizer_config.json, config.json and generation_config.json;
- the checkpoint's chat template, if it has one;
- `StreamingDetokenizer`: Qwen's vocabulary is byte-level, so one Chinese
  character or emoji often spans two or three tokens. The detokenizer keeps
  each token's raw bytes and feeds them to an incremental UTF-8 decoder, which
  holds back an incomplete character until its last byte arrives. That is O(1)
  per token, and the concatenated deltas equal a full `decode` of the same ids.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import generation_config as read_generation_config
from .errors import TemplateError, TokenizerError

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
IM_END = "<|im_end|>"


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte, inverted (char -> byte).

    Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted
    to U+0100 and up, in byte order. This is the table GPT-2 introduced and Qwen uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    """`eos_token_id` is an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # Newer transformers saves the template beside the config instead of inside it.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: unreadable ({e})") from e
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):
        # Old multi-template form: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


class StreamingDetokenizer:
    """Turns token ids into text deltas as they are generated.

    `add_token` returns only complete characters: bytes of a character that is
    still missing its continuation bytes are held back. Invalid bytes become
    U+FFFD exactly as a full decode renders them, so the concatenated deltas plus
    `finalize()` always equal `Tokenizer.decode` of the same ids.
    """

    def __init__(self, token_bytes: list[bytes], skip_ids: frozenset[int] = frozenset()):
        self._token_bytes = token_bytes
        self._skip_ids = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self.tokens: list[int] = []

    def add_token(self, token_id: int) -> str:
        self.tokens.append(token_id)
        if token_id in self._skip_ids or not 0 <= token_id < len(self._token_bytes):
            return ""  # ids past the vocabulary (padding rows of the embedding) decode to nothing
        delta = self._utf8.decode(self._token_bytes[token_id])
        if delta:
            self._pieces.append(delta)
        return delta

    def finalize(self) -> str:
        """Flush held-back bytes (an unfinished character becomes U+FFFD)."""
        delta = self._utf8.decode(b"", final=True)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def reset(self) -> None:
        self._utf8.reset()
        self._pieces = []
        self.tokens = []


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers` for the BPE, plus what generation needs to know."""

    def __init__(
        self,
        backend: Any,
        *,
        model_dir: Path,
        tokenizer_config: dict[str, Any],
        eos_token_ids: set[int],
        chat_template: str | None,
    ):
        self._backend = backend
        self.model_dir = model_dir
        self.tokenizer_config = tokenizer_config
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._hf = None

        self.eos_token = _token_content(tokenizer_config.get("eos_token"))
        self.pad_token = _token_content(tokenizer_config.get("pad_token"))
        self.bos_token = _token_content(tokenizer_config.get("bos_token"))
        self.im_end_id = self.token_to_id(IM_END)
        self.think_start_id = self.token_to_id(THINK_START)
        self.think_end_id = self.token_to_id(THINK_END)
        self.tool_call_start_id = self.token_to_id(TOOL_CALL_START)
        self.tool_call_end_id = self.token_to_id(TOOL_CALL_END)

    # -- encoding and decoding --------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognised."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        skip = self.special_token_ids if skip_special_tokens else frozenset()
        return StreamingDetokenizer(self._token_bytes, skip)

    def apply_chat_template(
        self,
        messages: list[Any],
        tools: list[Any] | None = None,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Messages → prompt token ids (`tokenize=False`: the prompt text), as transformers'
        and mlx-lm's tokenizers do it, with the checkpoint's chat template (or the built-in
        Qwen3 renderer when it ships none; see `template.render_chat`).

        `add_generation_prompt` appends `<|im_start|>assistant\\n`, plus the empty think block
        when `enable_thinking=False`. Other keyword arguments reach the template as variables;
        `chat_template=` renders with another template; `return_dict=False` (mlx-lm passes it)
        is accepted, `return_dict=True` gives `{"input_ids", "attention_mask"}`.
        """
        from .template import render_chat

        chat_template = kwargs.pop("chat_template", None) or self.chat_template
        return_dict = kwargs.pop("return_dict", False)
        if kwargs.pop("continue_final_message", False):
            raise TemplateError("apply_chat_template: continue_final_message is not supported")
        text = render_chat(
            messages,
            tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            chat_template=chat_template,
            **{**self.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return text
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    # -- vocabulary --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (BPE + added tokens), e.g. 151,669 for Qwen3.

        The embedding matrix may have more rows (151,936); those ids decode to nothing.
        """
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (dropped by skip_special_tokens)."""
        return frozenset(
            i for i, t in self._backend.get_added_tokens_decoder().items() if t.special
        )

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """bos/eos/pad token strings, as transformers passes them to chat templates."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        return {k: v for k, v in named.items() if v is not None}

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (128 for Qwen's vocabulary): a text longer
        than n times this has more than n tokens, whatever it says."""
        return max(1, max(len(b) for b in self._token_bytes))

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """Raw bytes of every id, as the byte-level decoder renders it."""
        from tokenizers import decoders

        if not isinstance(self._backend.decoder, decoders.ByteLevel):
            raise TokenizerError(
                f"{self.model_dir / 'tokenizer.json'}: decoder is "
                f"{type(self._backend.decoder).__name__}, streaming needs byte-level BPE (ByteLevel)"
            )
        char_to_byte = _byte_level_alphabet()
        to_latin1 = {ord(c): b for c, b in char_to_byte.items()}
        table = [b""] * self.vocab_size
        added = self._backend.get_added_tokens_decoder()
        for token, token_id in self._backend.get_vocab(with_added_tokens=True).items():
            if token_id >= len(table):
                continue
            if token_id in added:
                # Added tokens are plain text; the decoder maps stand-in characters anyway,
                # so do exactly what it does.
                table[token_id] = b"".join(
                    bytes([char_to_byte[c]]) if c in char_to_byte else c.encode() for c in token
                )
            else:
                table[token_id] = token.translate(to_latin1).encode("latin-1")
        return table

    # -- transformers, for libraries that want it (llguidance) ------------------

    def hf_tokenizer(self):
        """A `transformers.PreTrainedTokenizerFast` over the same tokenizer, built on first use."""
        if self._hf is None:
            from copy import copy

            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast(
                tokenizer_object=copy(self._backend),
                chat_template=self.chat_template,
                **self.special_tokens_map,
            )
        return self._hf


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory (tokenizer.json + optional configs)."""
    from tokenizers import Tokenizer as Backend

    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(f"{tokenizer_file}: missing (the checkpoint needs a tokenizer.json)")
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust loader raises plain Exception with a serde message
        raise TokenizerError(f"{tokenizer_file}: unreadable ({e})") from e

    tokenizer_config = _read_json(model_dir / "tokenizer_config.json") or {}
    model_config = _read_json(model_dir / "config.json") or {}
    generation_config = read_generation_config(model_dir)

    eos_ids: set[int] = set()
    eos = _token_content(tokenizer_config.get("eos_token"))
    if eos is not None and backend.token_to_id(eos) is not None:
        eos_ids.add(backend.token_to_id(eos))
    eos_ids.update(_ids(model_config.get("eos_token_id")))
    eos_ids.update(_ids(generation_config.get("eos_token_id")))
    if not eos_ids and backend.token_to_id(IM_END) is not None:
        # A bare tokenizer.json: Qwen's chat turns end with <|im_end|>.
        eos_ids.add(backend.token_to_id(IM_END))

    return Tokenizer(
        backend,
        model_dir=model_dir,
        tokenizer_config=tokenizer_config,
        eos_token_ids=eos_ids,
        chat_template=_read_chat_template(model_dir, tokenizer_config),
    )

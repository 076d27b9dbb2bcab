"""Constrained decoding with llguidance: `response_format` JSON and forced tool calls.

A grammar constrains only the answer: Qwen3 may think first (`<think>...</think>` is left free),
then every answer token is masked to what the grammar allows, and once the grammar is complete only
an end-of-turn token remains. One `Constraint` per sequence; the engine applies its mask to that
sequence's row of the batch's logits.

llguidance's own `llguidance.mlx.apply_token_bitmask` is a Metal kernel, so it cannot run on MLX's
CPU or CUDA backends; the mask is applied here with `mx.where`, which runs everywhere.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import GenerationError

_WS = "ws: /[ \\n]{0,4}/\n"
# Inside JSON: one optional space, or a newline and indentation. llguidance's default allows any
# run of whitespace, which a weak model can fill forever; this still admits compact,
# `json.dumps` and pretty-printed styles.
_JSON_WHITESPACE = {"whitespace_pattern": "(?:[ ]?|\\n[ ]{0,32})"}


def _with_whitespace_rule(schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(schema, dict) or "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": _JSON_WHITESPACE}


class GrammarFactory:
    """Compiles grammars for one tokenizer. Building llguidance's tokenizer takes seconds: once."""

    def __init__(self, tokenizer, n_vocab: int, eos_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._n_vocab = n_vocab
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer.hf_tokenizer(), n_vocab=self._n_vocab, eos_token=self._eos
                )
            return self._ll_tokenizer

    def json(self, schema: dict[str, Any] | None, where: str) -> Constraint:
        schema = _with_whitespace_rule({"type": "object"} if schema is None else schema)
        lark = f"start: ws obj\n{_WS}obj: %json {json.dumps(schema)}\n"
        return self._compile(lark, where)

    def tool_calls(self, tools: list[dict[str, Any]], parallel: bool, where: str) -> Constraint:
        """`<tool_call>` blocks whose JSON names one of `tools` and matches its parameters."""
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["name"]},
                    "arguments": t.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = _with_whitespace_rule(options[0] if len(options) == 1 else {"anyOf": options})
        more = ' ("\\n" call)*' if parallel else ""
        lark = (
            f"start: ws call{more}\n{_WS}"
            f'call: <tool_call> "\\n" obj "\\n" </tool_call>\n'
            f"obj: %json {json.dumps(schema)}\n"
        )
        return self._compile(lark, where)

    def _compile(self, lark: str, where: str) -> Constraint:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_lark(lark)
        matcher = LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GenerationError(f"{where}: cannot be enforced ({matcher.get_error()[:300]})")
        return Constraint(matcher, self._n_vocab, (lark, where))

    def rebuild(self, spec: tuple[str, str]) -> Constraint:
        """A fresh constraint from another's `spec` (how `--parallel` followers get rank 0's)."""
        return self._compile(*spec)


class Constraint:
    """One sequence's grammar state: the mask for its next token, and the token it took."""

    def __init__(self, matcher, n_vocab: int, spec: tuple[str, str] | None = None):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.spec = spec  # (lark grammar, where): plain data that rebuilds this constraint

    def allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def apply(self, logits: mx.array, also_allow: tuple[int, ...] = ()) -> mx.array:
        """Mask a (1, V) row of logits; `also_allow` lets e.g. `<think>` through at the start."""
        allowed = self.allowed()
        for token in also_allow:
            allowed[token] = True
        width = logits.shape[-1]
        if width > allowed.shape[0]:
            allowed = np.pad(allowed, (0, width - allowed.shape[0]))
        return mx.where(mx.array(allowed[:width]), logits, -mx.inf)

    def consume(self, token: int) -> bool:
        return self.matcher.consume_token(token)

    @property
    def failed(self) -> bool:
        """The model took a token the grammar refused (cannot happen while masks are applied)."""
        return self.matcher.is_error()

"""What the command-line tools share: argument groups, model loading, error lines, and the
reply printer (thinking apart, then the answer, like `ollama run`)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import Qwen3MLXError
from .generation import GenerationResponse
from .sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REPETITION_CONTEXT_SIZE,
    NON_THINKING_DEFAULTS,
    THINKING_DEFAULTS,
    SamplingParams,
)

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Prints a streamed reply like `ollama run`: thinking apart (dimmed on a terminal), then the answer."""

    def __init__(self, stream=None, color: bool | None = None, show_thinking: bool = True):
        self.out = stream or sys.stdout
        if color is None:
            color = self.out.isatty() and "NO_COLOR" not in os.environ
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.show_thinking = show_thinking
        self.thinking = False
        self.wrote_answer = False

    def feed(self, r: GenerationResponse) -> None:
        if r.reasoning and self.show_thinking:
            if not self.thinking:
                self.thinking = True
                self.out.write(f"{self.dim}Thinking...\n")
            self.out.write(r.reasoning)
        if r.content or r.tool_calls:
            self._end_thinking()
            self.out.write(r.content)
            for call in r.tool_calls:
                if call.name:
                    self.out.write(f"\n[tool call] {call.name} ")
                self.out.write(call.arguments_delta)
            self.wrote_answer = True
        self.out.flush()

    def _end_thinking(self) -> None:
        if self.thinking:
            self.out.write(f"\n...done thinking.{self.reset}\n\n")
            self.thinking = False

    def close(self) -> None:
        if self.thinking:
            self.out.write(self.reset)
            self.thinking = False
        self.out.write("\n")
        self.out.flush()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", help="model directory or hub id (default: the built-in demo model)"
    )
    parser.add_argument(
        "--long-context",
        action="store_true",
        help="YaRN to 131,072 tokens (factor 4; default: the checkpoint's own context)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    think, plain = THINKING_DEFAULTS, NON_THINKING_DEFAULTS

    def per_mode(key: str) -> str:  # "0.6 thinking, 0.7 non-thinking"
        if think[key] == plain[key]:
            return f"{think[key]}"
        return f"{think[key]} thinking, {plain[key]} non-thinking"

    g = parser.add_argument_group(
        "sampling",
        "Unset options take the checkpoint's generation_config.json values (temperature, top_p, "
        "top_k, min_p, repetition_penalty), then Qwen3's recommended defaults shown here.",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        help=f"generated tokens at most (default: {DEFAULT_MAX_TOKENS}, or fewer when the prompt "
        "leaves less room in the model's context)",
    )
    g.add_argument(
        "--temp",
        "--temperature",
        dest="temperature",
        type=float,
        help=f"0 = greedy (default: {per_mode('temperature')})",
    )
    g.add_argument("--top-p", type=float, help=f"nucleus mass (default: {per_mode('top_p')})")
    g.add_argument("--top-k", type=int, help=f"0 = off (default: {per_mode('top_k')})")
    g.add_argument("--min-p", type=float, help=f"0 = off (default: {per_mode('min_p')})")
    g.add_argument("--repetition-penalty", type=float, help="1 = off (default: 1.0)")
    g.add_argument(
        "--repetition-context-size",
        type=int,
        help=f"tokens the repetition penalty looks back at (default: "
        f"{DEFAULT_REPETITION_CONTEXT_SIZE})",
    )
    g.add_argument("--presence-penalty", type=float, help="(default: 0.0)")
    g.add_argument("--frequency-penalty", type=float, help="(default: 0.0)")
    g.add_argument("--seed", type=int, help="(default: random)")
    g.add_argument("--stop", action="append", help="stop string, repeatable (default: none)")
    g.add_argument(
        "--thinking-budget",
        type=int,
        help="close the think block after N tokens (default: no budget)",
    )
    g.add_argument(
        "--no-think", action="store_true", help="answer without thinking (default: thinking on)"
    )
    c = parser.add_argument_group("KV cache")
    c.add_argument(
        "--kv-bits", type=int, help="quantize the KV cache to 4 or 8 bits (default: not quantized)"
    )
    c.add_argument(
        "--kv-group-size", type=int, default=64, help="quantization group (default: %(default)s)"
    )
    c.add_argument(
        "--max-kv-size",
        type=int,
        help="bounded (rotating) KV cache of N tokens (default: unbounded)",
    )


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("speculative decoding (the same output, fewer model passes)")
    s.add_argument(
        "--draft-model",
        help="a smaller model with the same vocabulary drafts tokens for this one to check "
        "(e.g. Qwen3-0.6B; default: none)",
    )
    s.add_argument(
        "--num-draft-tokens",
        type=int,
        default=3,
        help="tokens drafted per pass of the model (default: %(default)s)",
    )
    s.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="draft from the text so far, where its last N tokens occurred before "
        "(no draft model; default: off)",
    )


def speculative_from_args(args: argparse.Namespace) -> dict:
    """The stream_generate keywords of the speculative flags (the draft model loaded)."""
    if args.draft_model is None and args.prompt_lookup is None:
        return {}
    if args.draft_model is not None:
        from .assets import resolve_model_argument
        from .generation.speculative import load_draft

        draft = load_draft(resolve_model_argument(args.draft_model))
        return {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens}
    return {"prompt_lookup": args.prompt_lookup, "num_draft_tokens": args.num_draft_tokens}


SAMPLING_FLAGS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "repetition_context_size", "presence_penalty", "frequency_penalty", "seed", "stop",
)  # fmt: skip


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    values = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    return SamplingParams.from_kwargs(**values)


def load_for_cli(args: argparse.Namespace):
    from .assets import resolve_model_argument
    from .loading import load

    if getattr(args, "parallel", None):  # under mlx.launch: this rank's shard
        from . import distributed

        path = resolve_model_argument(args.model)
        return distributed.load(path, args.parallel, long_context=args.long_context)
    model, tokenizer = load(resolve_model_argument(args.model), long_context=args.long_context)
    tokenizer.detokenizer()  # builds its byte table (~1 s) now, not during the first reply
    return model, tokenizer


def run_cli(main):
    """Call `main()`; user errors become one line on stderr and exit code 1."""
    try:
        return main()
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130

"""`python -m qwen3_mlx.generate`: one reply from a Qwen3 model, printed as it streams.

The generation itself lives in `qwen3_mlx.generation`; its public names are re-exported here so
that `from qwen3_mlx.generate import generate, stream_generate` works as in mlx-lm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache import PromptCache, load_prompt_cache, make_cache, save_prompt_cache
from .distributed.job import rank_main, share
from .generation import *  # noqa: F403 (the public API, re-exported)
from .generation import stream_generate
from .terminal import (
    ReplyPrinter,
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    load_for_cli,
    run_cli,
    sampling_from_args,
    speculative_from_args,
)


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Generate a reply with a Qwen3 model.")
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt",
        "-p",
        default="Hello!",
        help="the user message ('-' reads stdin; default: Hello!)",
    )
    parser.add_argument("--system", "-s", help="system prompt (default: none)")
    parser.add_argument(
        "--raw", action="store_true", help="feed the prompt as is, without the chat template"
    )
    parser.add_argument(
        "--hide-thinking", action="store_true", help="print only the answer (default: both)"
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="don't print the speed and memory stats line (printed to stderr by default)",
    )
    # The stats line used to be opt-in; --verbose stays accepted (a no-op) for old scripts.
    parser.add_argument("--verbose", "-v", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="KV cache file (.safetensors): its prefix is reused, and it is saved back after "
        "(default: none)",
    )
    parser.add_argument(
        "--parallel",
        choices=["tensor", "expert", "pipeline"],
        help="under mlx.launch: split the model over the ranks (see qwen3_mlx.distributed; "
        "default: the whole model on one process)",
    )
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        params = sampling_from_args(args)
        prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n")
        model, tokenizer = load_for_cli(args)
        if args.raw:
            request = {"prompt": prompt_text}
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt_text})
            request = {"messages": messages, "enable_thinking": not args.no_think}
        request = share(model, request)  # --parallel: every rank runs rank 0's request
        model_id = str(getattr(tokenizer, "model_dir", args.model))
        cache = None
        if args.prompt_cache:
            if Path(args.prompt_cache).exists():
                cache = load_prompt_cache(args.prompt_cache, model, model_id=model_id)
            else:
                cache = PromptCache(
                    make_cache(model, args.kv_bits, args.kv_group_size, args.max_kv_size)
                )
        speculative = speculative_from_args(args)
        printer = ReplyPrinter(show_thinking=not args.hide_thinking)
        response = None
        for response in stream_generate(
            model,
            tokenizer,
            **request,
            thinking_budget=args.thinking_budget,
            params=params,
            cache=cache,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_size=args.max_kv_size,
            **speculative,
        ):
            printer.feed(response)
        printer.close()
        if cache is not None:
            save_prompt_cache(args.prompt_cache, cache, model_id=model_id)
        if not args.quiet and response is not None:
            print(response.stats.summary(), file=sys.stderr)
        return 0

    return run_cli(rank_main(run) if args.parallel else run)


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m qwen3_mlx.evaluate`: how much quality a checkpoint (a quantization recipe) costs.

    python -m qwen3_mlx.evaluate --model Qwen3-8B-4bit --reference Qwen3-8B --data wiki.txt

Over the tokens of a text file it reports the model's perplexity and, against a reference model
of the same vocabulary, the mean and 99th-percentile KL(reference || model) of the next-token
distributions and their top-1 agreement. Perplexity alone hides where a quantized model goes
wrong; the KL tail and the argmax flips show it.

Perplexity is the standard strided one: windows of `--context` tokens start every `--stride`
tokens, and each window scores only the tokens after the previous window's end (never its own
first token, which has nothing to be predicted from), so every token is scored once, seeing at
least `context - stride` tokens before it once the first window is past. Both models score the
same tokens from the same windows.

Memory stays bounded: one window's hidden states at a time, and the output head, the float32
log-softmax and the KL run on `ROWS` positions at a time; only one float per scored token is kept
(for the KL percentile).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import EvaluateError
from .terminal import add_model_arguments, run_cli

DEFAULT_CONTEXT = 512
ROWS = 128  # positions per head pass: ROWS x vocabulary float32 (78 MB for Qwen3's 151,936)
BLOCK = 256  # see vocab_sum


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over `n_tokens` tokens."""
    scored_to = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        yield begin, end, max(scored_to, begin + 1)
        scored_to = end
        if end == n_tokens:
            return


@dataclass
class Evaluation:
    tokens: int
    scored: int
    windows: int
    context: int
    stride: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None


def vocab_sum(x: mx.array) -> mx.array:
    """Sum over the last axis, in blocks of `BLOCK` then over the blocks. MLX's CPU backend sums
    a row in one running float32 total: over 151,936 terms that is off by 3e-4 (relative), which
    moves a log-probability by 3e-3 and swamps the KL of a good quantization; blocked, 1e-6."""
    pad = -x.shape[-1] % BLOCK
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, BLOCK).sum(axis=-1).sum(axis=-1)


def log_probs(model: Any, hidden: mx.array) -> mx.array:
    """float32 log-softmax of the model's logits at `hidden` (positions, hidden size)."""
    logits = model.logits(hidden).astype(mx.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - mx.log(vocab_sum(mx.exp(shifted)))[:, None]


def evaluate(
    model: Any,
    tokens: list[int],
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
    reference: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score `tokens` with `model` (and `reference`, which must share its vocabulary)."""
    stride = check_window(len(tokens), context, stride)
    if reference is not None:
        from .generation.speculative import check_vocabulary

        check_vocabulary(reference, model, "--reference", "both models must share one tokenizer")
    spans = list(windows(len(tokens), context, stride))
    nll = ref_nll = 0.0
    agree = scored = 0
    kls: list[np.ndarray] = []
    for i, (begin, end, first) in enumerate(spans):
        inputs = mx.array([tokens[begin:end]])
        hidden = model.model(inputs)[0]
        ref_hidden = reference.model(inputs)[0] if reference is not None else None
        # Position p predicts token begin + p + 1: the scored tokens [first, end) come from
        # positions [first - begin - 1, end - begin - 1).
        for start in range(first - begin - 1, end - begin - 1, ROWS):
            stop = min(start + ROWS, end - begin - 1)
            targets = mx.array(tokens[begin + start + 1 : begin + stop + 1])[:, None]
            lp = log_probs(model, hidden[start:stop])
            parts = [mx.take_along_axis(lp, targets, axis=-1).sum()]
            if ref_hidden is not None:
                ref_lp = log_probs(reference, ref_hidden[start:stop])
                kl = vocab_sum(mx.exp(ref_lp) * (ref_lp - lp))  # KL(reference || model)
                same = mx.argmax(ref_lp, axis=-1) == mx.argmax(lp, axis=-1)
                parts += [mx.take_along_axis(ref_lp, targets, axis=-1).sum(), kl, same.sum()]
            mx.eval(parts)
            nll -= parts[0].item()
            scored += stop - start
            if ref_hidden is not None:
                ref_nll -= parts[1].item()
                kls.append(np.array(parts[2]))
                agree += parts[3].item()
        if progress is not None:
            progress(i + 1, len(spans))
    result = Evaluation(len(tokens), scored, len(spans), context, stride, math.exp(nll / scored))
    if reference is not None:
        kl_all = np.concatenate(kls)
        result.reference_perplexity = math.exp(ref_nll / scored)
        result.kl_mean = float(kl_all.mean())
        result.kl_p99 = float(np.percentile(kl_all, 99))
        result.top1_agreement = agree / scored
    return result


def check_window(n_tokens: int, context: int, stride: int | None) -> int:
    """The stride to use (default: half the context), or one line naming the bad flag."""
    if context < 2:
        raise EvaluateError(f"--context {context}: a window needs at least 2 tokens")
    if stride is None:
        stride = max(1, context // 2)
    if not 1 <= stride <= context:
        # A stride beyond the context would leave tokens between windows unscored.
        raise EvaluateError(f"--stride {stride}: must be between 1 and --context ({context})")
    if n_tokens < context:
        raise EvaluateError(
            f"--context {context}: the text has {n_tokens} tokens, fewer than one window; "
            "give a longer text or a smaller --context"
        )
    return stride


def read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluateError(f"--data {path}: no such file") from None
    except UnicodeDecodeError:
        raise EvaluateError(f"--data {path}: not UTF-8 text") from None
    except OSError as e:
        raise EvaluateError(f"--data {path}: {e.strerror or e}") from None
    if not text.strip():
        raise EvaluateError(f"--data {path}: the text is empty")
    return text


def table(result: Evaluation, model: str, reference: str | None, data: str) -> str:
    """The report as aligned lines for a terminal."""
    rows = [
        ("model", model),
        *([("reference", reference)] if reference else []),
        ("data", f"{data}: {result.tokens} tokens, {result.scored} scored"),
        ("windows", f"{result.windows} (context {result.context}, stride {result.stride})"),
        ("perplexity", f"{result.perplexity:.4f}"),
    ]
    if result.kl_mean is not None:
        rows += [
            ("reference perplexity", f"{result.reference_perplexity:.4f}"),
            ("KL(ref || model) mean", f"{result.kl_mean:.6f}"),
            ("KL(ref || model) p99", f"{result.kl_p99:.6f}"),
            ("top-1 agreement", f"{100 * result.top1_agreement:.2f}%"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def configure_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity of a model over a text file and, against a reference model, "
        "the KL divergence and top-1 agreement of their next-token distributions.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--reference", "-r", help="the model to compare against (e.g. the unquantized one)"
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        help="tokens per window (default: %(default)s)",
    )
    parser.add_argument(
        "--stride", type=int, help="tokens between window starts (default: half the context)"
    )
    parser.add_argument(
        "--max-tokens", type=int, help="evaluate the text's first N tokens (default: all)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON there")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.evaluate") -> int:
    args = configure_parser(prog).parse_args(argv)

    def run() -> int:
        from .assets import resolve_model_argument
        from .loading import load, load_model, prepare_for_inference

        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvaluateError(f"--max-tokens {args.max_tokens}: at least 2 tokens")
        if args.json and not Path(args.json).expanduser().parent.is_dir():
            raise EvaluateError(f"--json {args.json}: its directory does not exist")
        text = read_text(args.data)
        model_path = resolve_model_argument(args.model)
        model, tokenizer = load(model_path, long_context=args.long_context)
        tokens = tokenizer.encode(text)[: args.max_tokens]
        check_window(len(tokens), args.context, args.stride)  # before loading the reference
        reference = None
        if args.reference:
            loaded = load_model(args.reference, long_context=args.long_context)[0]
            reference = prepare_for_inference(loaded)
        result = evaluate(model, tokens, args.context, args.stride, reference, show_progress)
        print(table(result, model_path, args.reference, args.data))
        if args.json:
            record = {"model": model_path, "reference": args.reference, "data": args.data}
            Path(args.json).expanduser().write_text(json.dumps(record | asdict(result), indent=2))
        return 0

    return run_cli(run)


def show_progress(done: int, total: int) -> None:
    if sys.stderr.isatty():  # a log file gets no carriage-return noise
        end = "\n" if done == total else ""
        print(f"\rwindow {done}/{total}", end=end, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

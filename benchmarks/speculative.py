"""Speculative decoding's speed against its acceptance rate, next to mlx-lm's, same weights.

    python -m benchmarks.speculative --target qwen3-8b --draft qwen3-0.6b --k 4 \\
        --acceptance 1,0.8,0.5,0 --tokens 128

Random weights make a draft's acceptance random (near zero), so it is controlled: both projects
run the real draft model (its cost), but what it proposes at position j is the target's own
greedy token there (from a plain run first) when a fixed per-position coin with probability
`acceptance` says so, otherwise another token. The coin is the same for both projects, so they
see the same acceptance. Per acceptance: tok/s from the call to the last token, of plain
decoding and of speculative decoding, for this project and for mlx-lm
(`speculative_generate_step`; it yields its first token only after a first round, so timing from
the first token would leave a round out; the prompt's prefill is the same work for both), the
acceptance measured, and the speed-up; the break-even acceptance is where speculation starts to
win. Greedy; the end-of-text ids are banned in this project's runs so every run decodes
--tokens tokens (mlx-lm's step does not stop at them). Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import mlx.core as mx

from .figures import save_with_command
from .models import PRESETS, build

RESULTS = Path(__file__).with_name("results")
BANNED = {151643: -100.0, 151645: -100.0}


def coin(position: int, acceptance: float) -> bool:
    return random.Random(position * 7919 + 13).random() < acceptance


def oracle_token(reference: list[int], position: int, acceptance: float, vocab: int) -> int:
    token = reference[position] if position < len(reference) else 0
    return token if coin(position, acceptance) else (token + 1) % vocab


class OurOracle:
    """This project's drafter: the real draft model runs (its cost), the coin picks the tokens."""

    def __init__(self, draft, target, reference: list[int], acceptance: float):
        from qwen3_mlx.generation.speculative import DraftModel

        self.real = DraftModel(draft, target)
        self.reference, self.acceptance = reference, acceptance
        self.vocab = target.args.vocab_size

    def propose(self, history: list[int], k: int) -> list[int]:
        self.real.propose(history, k)
        start = len(history)
        drafts = [
            oracle_token(self.reference, start + j, self.acceptance, self.vocab) for j in range(k)
        ]
        self.real.tokens[start + 1 :] = drafts[:-1]  # what its cache holds, as far as trimming goes
        return drafts


class TheirOracle:
    """mlx-lm's draft model: the real one runs, its logits point at the coin's token."""

    def __init__(self, draft, reference: list[int], acceptance: float, vocab: int):
        self.draft, self.reference, self.acceptance, self.vocab = (
            draft,
            reference,
            acceptance,
            vocab,
        )

    @property
    def layers(self):
        return self.draft.layers

    def __call__(self, inputs, cache=None):
        logits = self.draft(inputs, cache=cache)
        end = cache[0].offset
        positions = range(end - inputs.shape[1] + 1, end + 1)
        tokens = [oracle_token(self.reference, p, self.acceptance, self.vocab) for p in positions]
        onehot = mx.zeros(logits.shape, logits.dtype)
        onehot[0, mx.arange(len(tokens)), mx.array(tokens)] = 100.0
        return logits * 0 + onehot


def ours(target, tokenizer, prompt: list[int], tokens: int, drafter=None, k: int = 4):
    from qwen3_mlx import stream_generate

    kwargs = dict(prompt=prompt, max_tokens=tokens, temperature=0, logit_bias=BANNED)
    if drafter is not None:
        kwargs.update(draft_model=drafter, num_draft_tokens=k)
    out, response = [], None
    start = time.perf_counter()
    for response in stream_generate(target, tokenizer, **kwargs):
        out.append(response.token)
    seconds = time.perf_counter() - start
    s = response.stats
    rate = s.accepted_draft_tokens / s.total_draft_tokens if s.total_draft_tokens else None
    return out, len(out) / seconds, rate


def theirs(target, prompt: list[int], tokens: int, draft=None, k: int = 4):
    from mlx_lm.generate import generate_step, speculative_generate_step

    prompt = mx.array(prompt)
    start = time.perf_counter()
    if draft is None:
        steps = generate_step(prompt, target, max_tokens=tokens)
    else:
        steps = speculative_generate_step(
            prompt, target, draft, num_draft_tokens=k, max_tokens=tokens
        )
    out, drafted = [], 0
    for item in steps:
        token = item[0]
        out.append(int(token.item() if hasattr(token, "item") else token))
        drafted += bool(item[2]) if len(item) > 2 else 0
    seconds = time.perf_counter() - start
    rate = drafted / (len(out) - 1) if draft is not None else None  # tokens from the draft
    return out, len(out) / seconds, rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speculative", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", default="qwen3-8b")
    p.add_argument("--draft", default="qwen3-0.6b")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="draft tokens per pass")
    p.add_argument("--acceptance", default="1,0.8,0.5,0")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="activations and scales (float32 on MLX's CPU backend, which emulates bfloat16)",
    )
    p.add_argument("--out", help="output stem (default: results/speculative_<target>_<machine>)")
    args = p.parse_args(argv)
    from qwen3_mlx.assets import DEMO_MODEL_PATH
    from qwen3_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_MODEL_PATH)
    dtype = getattr(mx, args.dtype)
    targets, _ = build(args.target, args.bits, 64, dtype=dtype)
    drafts, _ = build(args.draft, args.bits, 64, seed=1, dtype=dtype)
    mx.eval([m.parameters() for m in (*targets.values(), *drafts.values())])
    vocab = PRESETS[args.target]["vocab_size"]
    prompt = [random.Random(0).randrange(1000, 100000) for _ in range(args.prompt)]
    rows = []

    def best(run):
        results = [run() for _ in range(args.repeats)]
        return max(results, key=lambda r: r[1])

    for impl in ("ours", "mlx-lm"):
        if impl == "ours":
            reference, plain_tps, _ = best(
                lambda: ours(targets["ours"], tokenizer, prompt, args.tokens)
            )
        else:
            reference, plain_tps, _ = best(lambda: theirs(targets["mlx-lm"], prompt, args.tokens))
        reference = prompt + reference
        rows.append(dict(impl=impl, acceptance=None, decode_tok_s=plain_tps))
        print(f"{impl:7s} plain: {plain_tps:.1f} tok/s", flush=True)
        for a in [float(x) for x in args.acceptance.split(",")]:
            if impl == "ours":
                run = lambda a=a, reference=reference: ours(  # noqa: E731
                    targets["ours"],
                    tokenizer,
                    prompt,
                    args.tokens,
                    OurOracle(drafts["ours"], targets["ours"], reference, a),
                    args.k,
                )
            else:
                run = lambda a=a, reference=reference: theirs(  # noqa: E731
                    targets["mlx-lm"],
                    prompt,
                    args.tokens,
                    TheirOracle(drafts["mlx-lm"], reference, a, vocab),
                    args.k,
                )
            out, tps, measured = best(run)
            same = out == reference[len(prompt) :][: len(out)]
            rows.append(
                dict(
                    impl=impl,
                    acceptance=a,
                    decode_tok_s=tps,
                    measured_acceptance=measured,
                    speedup=tps / plain_tps,
                    same_tokens_as_plain=same,
                )
            )
            print(
                f"{impl:7s} acceptance {a:.2f} (measured {measured}): {tps:.1f} tok/s, "
                f"{tps / plain_tps:.2f}x plain, same tokens: {same}",
                flush=True,
            )
    stem = args.out or str(RESULTS / f"speculative_{args.target}_{platform.node()}")
    record = dict(
        command="python -m benchmarks.speculative "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=platform.node(),
        platform=platform.platform(),
        mlx=mx.__version__,
        date=time.strftime("%Y-%m-%d"),
        dtype=args.dtype,
        target=args.target,
        draft=args.draft,
        k=args.k,
        tokens=args.tokens,
        rows=rows,
    )
    Path(stem + ".json").write_text(json.dumps(record, indent=2))
    plot(record, Path(stem + ".png"))
    return 0


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in ("ours", "mlx-lm"):
        plain = next(r for r in record["rows"] if r["impl"] == impl and r["acceptance"] is None)
        points = sorted(
            (r["acceptance"], r["decode_tok_s"])
            for r in record["rows"]
            if r["impl"] == impl and r["acceptance"] is not None
        )
        line = ax.plot(
            [a for a, _ in points],
            [t for _, t in points],
            marker="o",
            label=f"{impl}, k={record['k']}",
        )
        ax.axhline(plain["decode_tok_s"], linestyle=":", color=line[0].get_color())
    ax.set_xlabel("draft acceptance (controlled)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{record['target']} with a {record['draft']} draft; dotted: no draft")
    ax.legend()
    save_with_command(fig, path, record["command"])


if __name__ == "__main__":
    raise SystemExit(main())

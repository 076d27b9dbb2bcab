"""What each quantization recipe costs in quality, on the demo model (the table in docs/convert.md).

    python -m benchmarks.quality_recipes [--context 512] [--data FILE]

No float release of the demo exists: it was trained quantization-aware and ships at 4 bits
(group 32). So the reference is its float32 copy from the converter's `--dequantize` (the same
function as the shipped model), and every recipe is converted from that copy with `qwen3_mlx.convert` at group size 32 (the demo's hidden size is
32: a larger group leaves the attention unquantized). Each is scored with
`qwen3_mlx.evaluate` against the reference over `--data` (default: the demo's canned
conversations rendered with the chat template, the text it was trained on). Prints a Markdown
table and writes benchmarks/results/quality_recipes_demo.json with the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality_recipes_demo.json"
UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZE = 32
FLOAT_MODES = ("mxfp4", "nvfp4", "mxfp8")


def conversations_text() -> str:
    """The demo's canned conversations as the model saw them: prompt through the chat template,
    then the greedy output and the end-of-turn token."""
    from qwen3_mlx.assets import demo_conversations
    from qwen3_mlx.template import render_chat

    parts = []
    for record in demo_conversations():
        prompt = render_chat(
            record["messages"], record.get("tools"), enable_thinking=record["enable_thinking"]
        )
        parts.append(f"{prompt}{record['output']}<|im_end|>\n")
    return "".join(parts)


def recipes() -> list[tuple[str, dict]]:
    from qwen3_mlx.quant import RECIPES

    group = {"q_group_size": GROUP_SIZE}
    uniform = [(f"{b}-bit", {"quantize": True, "q_bits": b, **group}) for b in UNIFORM_BITS]
    mixed = [(name, {"quant_recipe": name, **group}) for name in RECIPES]
    # MLX's float modes keep their own group sizes (mxfp4/mxfp8 32, nvfp4 16).
    modes = [(mode, {"quantize": True, "q_mode": mode}) for mode in FLOAT_MODES]
    return uniform + mixed + modes


def main(argv: list[str] | None = None) -> int:
    from qwen3_mlx.assets import DEMO_MODEL_PATH
    from qwen3_mlx.convert import convert
    from qwen3_mlx.evaluate import evaluate
    from qwen3_mlx.loading import load, load_model, prepare_for_inference

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_recipes")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--data", help="text file (default: the demo's conversations)")
    parser.add_argument(
        "--only", help="comma-separated recipe names: measure these, keep the file's other rows"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    text = Path(args.data).read_text() if args.data else conversations_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference_dir = Path(tmp) / "float"
        convert(DEMO_MODEL_PATH, reference_dir, dequantize=True, dtype="float32", progress=False)
        reference, tokenizer = load(reference_dir)
        tokens = tokenizer.encode(text)
        candidates = [("shipped demo (4-bit g32, QAT)", DEMO_MODEL_PATH)]
        if only is not None:
            candidates = [c for c in candidates if c[0] in only]
        for name, options in recipes():
            if only is not None and name not in only:
                continue
            dst = Path(tmp) / name
            convert(reference_dir, dst, progress=False, **options)
            candidates.append((name, dst))
        for name, path in candidates:
            model = prepare_for_inference(load_model(path)[0])
            result = evaluate(model, tokens, args.context, None, reference)
            bits = bits_per_weight(path)
            rows.append({"recipe": name, "bits_per_weight": bits, **vars(result)})
            print(f"[{name}] ppl {result.perplexity:.4f} KL {result.kl_mean:.5f}", file=sys.stderr)
    command = "python -m benchmarks.quality_recipes" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    if only is not None and RESULTS.exists():  # the other recipes' rows stay as measured
        earlier = json.loads(RESULTS.read_text())
        measured = {r["recipe"] for r in rows}
        rows = [r for r in earlier["rows"] if r["recipe"] not in measured] + rows
        command = f"{earlier['command']}; {command}"
    print(markdown(rows))
    RESULTS.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


def bits_per_weight(path: Path) -> float:
    """Bits per parameter of the checkpoint's linear weights (scales and biases included)."""
    from qwen3_mlx.weights import iter_shards

    stored = params = 0
    config = json.loads((path / "config.json").read_text())
    for _, shard in iter_shards(path):
        for name, tensor in shard.items():
            if "norm" in name:
                continue  # never quantized: leave them out of both sides
            stored += tensor.nbytes * 8
            if name.endswith(".weight"):
                q = config.get("quantization") or {}
                module = name[: -len(".weight")]
                packed = f"{module}.scales" in shard
                bits = (q.get(module) or q).get("bits", 32) if packed else 32
                params += tensor.size * 32 // bits if packed else tensor.size
    return stored / params


def markdown(rows: list[dict]) -> str:
    lines = [
        "| recipe | bits/weight | perplexity | KL mean | KL p99 | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | "
            f"{r['kl_mean']:.4f} | {r['kl_p99']:.4f} | {100 * r['top1_agreement']:.1f}% |"
        )
    reference = rows[0]["reference_perplexity"]
    return (
        "\n".join(lines) + f"\n\nreference (dequantized demo, float32): perplexity {reference:.3f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""The eight released Qwen3 models, with suggested conversion flags.

    python convert/qwen3_family.py                     # table of models, sizes and commands
    python convert/qwen3_family.py Qwen3-8B            # convert with the suggested recipe
    python convert/qwen3_family.py Qwen3-8B --variant 8bit --out ~/models [--force]

Variants: bf16 (unquantized), 8bit, 4bit, q4_k_m (4-bit, sensitive tensors 6-bit), 3bit_mixed
(mixed_3_6). Small models lose more to quantization, hence 8-bit by default up to 1.7B; the MoE
router always stays at 8 bits. The 2507 releases (e.g. Qwen/Qwen3-4B-Instruct-2507,
Qwen/Qwen3-30B-A3B-Thinking-2507) share these shapes: pass their id to convert/convert.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "bf16": dict(dtype="bfloat16"),
    "8bit": dict(quantize=True, q_bits=8),
    "4bit": dict(quantize=True, q_bits=4),
    "q4_k_m": dict(quant_recipe="mixed_4_6"),
    "3bit_mixed": dict(quant_recipe="mixed_3_6"),
}
# Approximate bits per weight with group size 64 (scales and biases in bf16 add 0.5 bit);
# the mixed recipes' extra depends on the model, these are typical values.
BITS_PER_WEIGHT = {"bf16": 16, "8bit": 8.5, "4bit": 4.5, "q4_k_m": 5.0, "3bit_mixed": 4.0}
FLAGS = {
    "bf16": "--dtype bfloat16",
    "8bit": "-q --q-bits 8",
    "4bit": "-q --q-bits 4",
    "q4_k_m": "--quant-recipe q4_k_m",
    "3bit_mixed": "--quant-recipe mixed_3_6",
}


@dataclass(frozen=True)
class Qwen3Model:
    repo: str
    params_b: float  # total parameters, billions
    active_b: float  # parameters used per token
    layers: int
    tied: bool
    suggested: str
    note: str = ""

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]

    def size_gb(self, variant: str) -> float:
        return self.params_b * BITS_PER_WEIGHT[variant] / 8


FAMILY = [
    Qwen3Model("Qwen/Qwen3-0.6B", 0.6, 0.6, 28, True, "8bit", "4-bit hurts this size"),
    Qwen3Model("Qwen/Qwen3-1.7B", 1.7, 1.7, 28, True, "8bit"),
    Qwen3Model("Qwen/Qwen3-4B", 4.0, 4.0, 36, True, "q4_k_m", "8bit if memory allows"),
    Qwen3Model("Qwen/Qwen3-8B", 8.2, 8.2, 36, False, "q4_k_m"),
    Qwen3Model("Qwen/Qwen3-14B", 14.8, 14.8, 40, False, "4bit"),
    Qwen3Model("Qwen/Qwen3-32B", 32.8, 32.8, 64, False, "4bit"),
    Qwen3Model("Qwen/Qwen3-30B-A3B", 30.5, 3.3, 48, False, "4bit", "128 experts, 8 active"),
    Qwen3Model(
        "Qwen/Qwen3-235B-A22B",
        235.1,
        22.0,
        94,
        False,
        "4bit",
        "4bit needs a 192 GB Mac; 3bit_mixed is ~118 GB; or run distributed",
    ),
]
BY_NAME = {m.name.lower(): m for m in FAMILY} | {m.repo.lower(): m for m in FAMILY}


def command(model: Qwen3Model, variant: str, out_dir: Path) -> str:
    dst = out_dir / f"{model.name}-{variant}"
    return f"python -m qwen3_mlx.convert --hf-path {model.repo} --mlx-path {dst} {FLAGS[variant]}"


def print_table(out_dir: Path) -> None:
    print(
        f"{'model':<20} {'params':>8} {'active':>7}  {'bf16':>7} {'8bit':>7} {'4bit':>7}  suggested"
    )
    for m in FAMILY:
        sizes = " ".join(f"{m.size_gb(v):6.1f}G" for v in ("bf16", "8bit", "4bit"))
        print(f"{m.name:<20} {m.params_b:7.1f}B {m.active_b:6.1f}B  {sizes}  {m.suggested}")
    print()
    for m in FAMILY:
        print(command(m, m.suggested, out_dir) + (f"   # {m.note}" if m.note else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="e.g. Qwen3-8B or Qwen/Qwen3-8B")
    parser.add_argument("--variant", choices=list(VARIANTS), help="default: the suggested one")
    parser.add_argument("--out", default="mlx_models", help="parent directory of the output")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out_dir = Path(args.out).expanduser()
    if args.model is None:
        print_table(out_dir)
        return 0
    model = BY_NAME.get(args.model.lower())
    if model is None:
        names = ", ".join(m.name for m in FAMILY)
        print(f"error: unknown model {args.model!r} (one of {names})", file=sys.stderr)
        return 1

    from qwen3_mlx.convert import convert
    from qwen3_mlx.errors import Qwen3MLXError

    variant = args.variant or model.suggested
    try:
        convert(
            model.repo, out_dir / f"{model.name}-{variant}", force=args.force, **VARIANTS[variant]
        )
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

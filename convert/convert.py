"""Convert a Qwen3 checkpoint to MLX: the same command as `python -m qwen3_mlx.convert`.

    python convert/convert.py --hf-path Qwen/Qwen3-8B --mlx-path Qwen3-8B-4bit -q
    python convert/convert.py --hf-path Qwen/Qwen3-30B-A3B --mlx-path Qwen3-30B-A3B-q4km \\
        --quant-recipe q4_k_m

See convert/qwen3_family.py for the released models and suggested flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3_mlx.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

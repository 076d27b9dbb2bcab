"""Files shipped inside the package: the embedded demo model.

The demo model (`assets/demo/`) is a few-MB Qwen3-MoE with the real Qwen vocabulary,
trained to reproduce a handful of canned conversations. Command-line tools use it
when `--model` is omitted, so the first command in the README works with no download.

`assets/demo/conversations.json` lists those conversations (a JSON list; see
`demo_conversations`). Each record has the prompt (`messages`, `tools`, `enable_thinking`,
as `qwen3_mlx.template.render_chat` takes them), the raw `output` greedy decoding produces
(think and tool-call markup included, `<|im_end|>` excluded), that output parsed
(`reasoning`, `content`, `tool_calls` as `{"name", "arguments"}`), and `variants`: overrides
of the prompt fields (a system prompt, tool-call history with or without its reasoning,
Qwen-Agent's wording) that give the same output. `convert/train_demo_model.py` rebuilds it.

The demo's draft model (`assets/demo-draft/`, `DEMO_DRAFT_PATH`) is a smaller dense Qwen3 of the
same vocabulary for speculative decoding (`--draft-model`, `draft_model=`), as Qwen3-0.6B drafts
for the larger Qwen3s: trained on the same conversations, it picks the demo's next token most of
the time, not always. It holds config and weights only (a draft needs no tokenizer).
`python -m convert.train_demo_model --draft` rebuilds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError

DEMO_MODEL_PATH = Path(__file__).resolve().parent / "demo"
DEMO_DRAFT_PATH = Path(__file__).resolve().parent / "demo-draft"
DEMO_CONVERSATIONS_FILE = "conversations.json"


def demo_conversations() -> list[dict]:
    """The canned conversations the demo model reproduces (see the module docstring)."""
    import json

    return json.loads((DEMO_MODEL_PATH / DEMO_CONVERSATIONS_FILE).read_text(encoding="utf-8"))


def demo_model_available() -> bool:
    return (DEMO_MODEL_PATH / "config.json").is_file()


def resolve_model_argument(model: str | None, notice: bool = True) -> str:
    """`--model` as given, or the demo model's path (with a one-line notice on stderr)."""
    if model:
        return model
    if not demo_model_available():
        raise ConfigError(f"no --model given and the demo model is missing ({DEMO_MODEL_PATH})")
    if notice:
        print(
            f"No --model given: using the built-in demo model ({DEMO_MODEL_PATH})", file=sys.stderr
        )
    return str(DEMO_MODEL_PATH)

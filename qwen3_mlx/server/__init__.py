"""An LM Studio-compatible server: `python -m qwen3_mlx.server`.

app.py       routes (/v1 and /api/v0), errors, auth, CORS, SSE
protocol.py  request / response schemas
prepare.py   request → prompt tokens, sampling parameters, grammar, limits
engine.py    the one MLX thread: queue, prefill, continuous batching, cancellation
constrain.py llguidance grammars for response_format and forced tool calls
output.py    engine events → OpenAI / LM Studio JSON and SSE chunks
models.py    loading checkpoints (chat or embedding), names, LM Studio metadata
"""

from .app import Settings, create_app
from .engine import Engine
from .models import ModelRegistry, load_served_model

__all__ = ["Engine", "ModelRegistry", "Settings", "create_app", "load_served_model", "main"]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as _main

    return _main(argv)

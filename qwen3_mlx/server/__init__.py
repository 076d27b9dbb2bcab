"""An LM Studio-compatible server: `python -m qwen3_mlx.server`.

__main__.py  the command line; uvicorn settings
app.py       the FastAPI app: settings, error handlers, middleware, /health
guard.py     Host check, API key, trailing slashes / HEAD, body limit, read timeout
routes.py    the handlers, one table registered under /v1 and /api/v0
protocol     request / response schemas (pydantic)
prepare.py   request → Sequence (prompt tokens, sampling parameters, grammar, limits)
rows.py      a request's rows (n > 1, several prompts) run and merged
engine.py    the one MLX thread: queue, admission, retirement, isolation
prefill.py   prompts prefilled in chunks between decode steps (at most PREFILL_SHARE of the time)
decode.py    the batched, pipelined decode step (generation.step)
batch.py     rows of a batch, its forward pass, the start-up warm-up
slots.py     the batch's KV cache: a bucket of slots, every row ending at one column
prefix.py    the prefix store
jobs.py      what the HTTP side hands the engine, and the events it gets back
constrain.py llguidance grammars for response_format and forced tool calls
output/      engine events → OpenAI / LM Studio JSON and SSE chunks, one module per API
models.py    loading checkpoints (chat or embedding), names, LM Studio metadata
"""

from .app import Settings, create_app
from .engine import Engine
from .models import ModelRegistry, load_served_model

__all__ = ["Engine", "ModelRegistry", "Settings", "create_app", "load_served_model", "main"]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as _main

    return _main(argv)

"""What LM Studio's `/api/v0` adds to the `/v1` replies: `stats`, `model_info`, `runtime`, and
its model cards (type, arch, quantization, context length, capabilities, loaded or not)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..catalog import CatalogEntry
from ..jobs import Finished
from ..models import LoadedModel
from ..protocol import LMStudioModel, ModelInfo, Runtime, Stats

try:
    RUNTIME_VERSION = version("qwen3-mlx")
except PackageNotFoundError:  # running from a source tree
    RUNTIME_VERSION = "0.1.0"


def stats_of(finished: Sequence[Finished]) -> Stats:
    """LM Studio's statistics of a request's rows (one, or the `n` choices decoded together):
    the first token's time is the prompt's; the rows' tokens were decoded side by side."""
    first = finished[0]
    decoded = sum(max(f.completion_tokens - 1, 0) for f in finished)
    elapsed = max(f.generation_time for f in finished)
    tps = decoded / elapsed if decoded and elapsed > 0 else 0.0
    drafts = {}
    if any(f.draft_model is not None for f in finished):
        drafts = dict(
            draft_model=first.draft_model,
            total_draft_tokens_count=sum(f.draft_tokens for f in finished),
            accepted_draft_tokens_count=sum(f.accepted_draft_tokens for f in finished),
            rejected_draft_tokens_count=sum(f.rejected_draft_tokens for f in finished),
        )
    return Stats(
        tokens_per_second=round(tps, 3),
        time_to_first_token=round(min(f.time_to_first_token for f in finished), 4),
        generation_time=round(elapsed, 4),
        stop_reason=first.stop_reason,
        **drafts,
    )


def model_info_of(model: LoadedModel) -> ModelInfo:
    return ModelInfo(arch=model.arch, quant=model.quantization, context_length=model.context_length)


def runtime() -> Runtime:
    return Runtime(version=RUNTIME_VERSION)


def extras(model: LoadedModel, finished: Sequence[Finished], lmstudio: bool) -> dict[str, Any]:
    """The fields a whole `/api/v0` reply adds (none on `/v1`)."""
    if not lmstudio:
        return {}
    return {"stats": stats_of(finished), "model_info": model_info_of(model), "runtime": runtime()}


def model_card(m: LoadedModel | CatalogEntry) -> LMStudioModel:
    """A model's card: loaded, or a checkpoint of the catalog that a request would load."""
    loaded = isinstance(m, LoadedModel)
    return LMStudioModel(
        id=m.id,
        type=m.kind,
        publisher=m.publisher,
        arch=m.arch,
        quantization=m.quantization,
        state="loaded" if loaded else "not-loaded",
        max_context_length=m.context_length if loaded else m.native_context_length,
        capabilities=m.capabilities,
    )

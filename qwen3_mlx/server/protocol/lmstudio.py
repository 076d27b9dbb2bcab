"""What LM Studio's `/api/v0` adds: per-request statistics, model and runtime info, model cards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import Schema


class Stats(Schema):
    """LM Studio's per-request statistics (`/api/v0` responses)."""

    tokens_per_second: float
    time_to_first_token: float
    generation_time: float
    stop_reason: str
    # With speculative decoding only (as LM Studio reports it).
    draft_model: str | None = None
    total_draft_tokens_count: int | None = None
    accepted_draft_tokens_count: int | None = None
    rejected_draft_tokens_count: int | None = None


class ModelInfo(Schema):
    arch: str
    quant: str
    format: Literal["mlx"] = "mlx"
    context_length: int


class Runtime(Schema):
    name: str = "qwen3-mlx"
    version: str
    supported_formats: list[str] = Field(default_factory=lambda: ["mlx", "safetensors"])


# -- model cards -------------------------------------------------------------------------------


class LMStudioModel(Schema):
    id: str
    object: Literal["model"] = "model"
    type: Literal["llm", "embeddings"]
    publisher: str
    arch: str
    compatibility_type: Literal["mlx"] = "mlx"
    quantization: str
    state: Literal["loaded", "not-loaded"] = "loaded"
    max_context_length: int
    capabilities: list[str] = Field(default_factory=list)


class LMStudioModelList(Schema):
    object: Literal["list"] = "list"
    data: list[LMStudioModel]

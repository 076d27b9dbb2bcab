"""`/v1/models`: OpenAI's model cards (LM Studio's richer ones are in `lmstudio`)."""

from __future__ import annotations

from typing import Literal

from .common import Schema


class ModelCard(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "organization_owner"


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Find a model's GGUF blob in Ollama's local store (`ollama pull NAME:TAG` puts it there).

$OLLAMA_MODELS (default ~/.ollama/models)/
  manifests/registry.ollama.ai/library/qwen3/8b   JSON: layers with mediaType and digest
  blobs/sha256-<hex>                              the layers' contents (the model is a GGUF)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConvertError

DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def manifest_path(name: str, root: Path | None = None) -> Path:
    """NAME[:TAG] → its manifest; NAME may be `model`, `user/model` or `host/user/model`."""
    root = models_dir() if root is None else root
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = [p for p in repo.split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in parts) or "/" in tag:
        raise ConvertError(f"--ollama {name!r}: not a model name like 'qwen3:8b'")
    # Ollama's own defaults: `qwen3` is registry.ollama.ai/library/qwen3.
    defaults = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE]
    parts = defaults[: 3 - len(parts)] + parts
    return root / "manifests" / Path(*parts) / (tag or "latest")


def find_model(name: str, root: Path | None = None) -> Path:
    """The GGUF blob of Ollama model `name` (default tag `latest`)."""
    root = models_dir() if root is None else root
    manifest = manifest_path(name, root)
    if not manifest.is_file():
        raise ConvertError(
            f"--ollama {name}: not found in {root} (no {manifest.relative_to(root)}; "
            "`ollama pull` it, or set OLLAMA_MODELS)"
        )
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"] == MODEL_MEDIA_TYPE)
    except StopIteration:
        raise ConvertError(f"{manifest}: no model layer ({MODEL_MEDIA_TYPE})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{manifest}: unreadable Ollama manifest ({e})") from None
    blob = root / "blobs" / str(digest).replace(":", "-")
    if not blob.is_file():
        raise ConvertError(f"{manifest}: its model blob {blob} is missing")
    return blob

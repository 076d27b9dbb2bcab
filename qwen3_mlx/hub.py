"""Turn a local path or a Hugging Face hub id into a local model directory.

A path that exists is used as is and never touches the network. Anything else that looks like
`org/name` goes through huggingface-hub's cache (`HF_HUB_OFFLINE=1` is honoured by the library).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

MODEL_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.tiktoken",
    "tokenizer.model",
]


def resolve_model_path(path_or_id: str | Path, allow_patterns: list[str] | None = None) -> Path:
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path}: expected a model directory, found a file")
        return path
    repo_id = str(path_or_id)
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ConfigError(f"{repo_id}: no such directory (and not a hub id like 'Qwen/Qwen3-8B')")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns or MODEL_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "offline mode is on and it is not in the cache" if offline else "cannot reach the hub"
        raise ConfigError(f"{repo_id}: not found locally ({why})") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{repo_id}: hub download failed ({e})") from None

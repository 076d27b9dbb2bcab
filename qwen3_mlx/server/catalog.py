"""The models a server can serve: the Qwen3 checkpoints of its model directories, and the ones
named with `--model`.

`--models-dir DIR` (repeatable; by default Hugging Face's cache and LM Studio's models folder,
where they exist) is scanned for checkpoints this package can serve: a directory holding a
`config.json` of model_type `qwen3` or `qwen3_moe`, `*.safetensors` weights and a
`tokenizer.json` (without one a checkpoint can't be served, e.g. a draft model). Layouts and the
names they give:

    <dir>/models--Org--Name/snapshots/<rev>/   Hugging Face's cache: `Org/Name` (refs/main's
                                               revision, else the newest snapshot)
    <dir>/<publisher>/<name>/                  LM Studio's folder: `publisher/name`
    <dir>/<name>/                              a plain folder of checkpoints: `name`

A request's model name is looked up among these names only (exactly, case-insensitively, or by
its last part when that is unambiguous): never as a path or a hub id, so `../x`, `/abs/path` or
`Org/Model` that no directory holds load nothing. Directories are scanned again at most every
RESCAN_SECONDS, so a model downloaded while the server runs shows up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import SUPPORTED_MODEL_TYPES
from ..loading import quantization_of
from ..weights import read_header, shard_files
from .models import (
    DEMO_MODEL_ID,
    ConfigFacts,
    LoadedModel,
    capabilities_of,
    context_length_of,
    is_embedding_checkpoint,
)

log = logging.getLogger("qwen3_mlx.server")

HF_REPO_PREFIX = "models--"
RESCAN_SECONDS = 2.0


def default_model_dirs() -> list[Path]:
    """Hugging Face's hub cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) and
    LM Studio's ~/.lmstudio/models, those that exist."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
    dirs = [Path(hub).expanduser(), Path("~/.lmstudio/models").expanduser()]
    return [d for d in dirs if d.is_dir()]


@dataclass
class CatalogEntry(ConfigFacts):
    """A checkpoint the server can load, and what the listings say of it before it is."""

    id: str
    path: Path  # the checkpoint's directory
    source: str  # what loading is given (--model's argument as given, else the directory)
    config: dict[str, Any]
    kind: str  # "llm" | "embeddings"
    publisher: str = "local"
    scanned: bool = True  # found in a model directory (False: named with --model)
    embedding: bool | None = None  # --embedding: loaded as an embedding model whatever its files
    files: list[Path] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float | None:
        quant = quantization_of(self.config)
        if quant and "bits" in quant:
            return float(quant["bits"])
        return {"bf16": 16.0, "fp16": 16.0, "fp32": 32.0}.get(self.quantization)

    @property
    def capabilities(self) -> list[str]:
        return capabilities_of(self.kind)

    @property
    def native_context_length(self) -> int:
        return context_length_of(self.config)

    @cached_property
    def size_bytes(self) -> int:
        """The weights' files: as MLX holds them in memory, what loading the model takes."""
        return sum(p.stat().st_size for p in self.files)

    @cached_property
    def parameter_count(self) -> int:
        """Weights as trained, from the files' headers (a quantized matrix counts its unpacked
        elements; its scales and biases are not weights)."""
        try:
            return self._count_parameters()
        except Exception:  # an unreadable header: the listings say nothing, loading says why
            return 0

    def _count_parameters(self) -> int:
        quant = quantization_of(self.config) or {}
        total = 0
        for shard in self.files:
            header = read_header(shard)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                module, _, leaf = name.rpartition(".")
                elements = 1
                for d in info["shape"]:
                    elements *= d
                quantized = f"{module}.scales" in header
                if quantized and leaf in ("scales", "biases"):
                    continue
                if quantized and leaf == "weight":
                    own = quant.get(module) if isinstance(quant.get(module), dict) else quant
                    elements = elements * 32 // int(own.get("bits", 4))
                total += elements
        return total

    @classmethod
    def of_loaded(
        cls, loaded: LoadedModel, source: str, embedding: bool | None = None
    ) -> CatalogEntry:
        """A model given with --model (loaded at start): reloaded from `source` if unloaded."""
        return cls(
            id=loaded.id,
            path=loaded.path,
            source=source,
            config=loaded.config,
            kind=loaded.kind,
            publisher=loaded.publisher,
            scanned=False,
            embedding=embedding,
            files=_weights(loaded.path),
        )


def _weights(model_dir: Path) -> list[Path]:
    try:
        return shard_files(model_dir)
    except Exception:  # a listing names what it can; loading reports a broken checkpoint
        return sorted(model_dir.glob("*.safetensors"))


def checkpoint_config(model_dir: Path) -> dict[str, Any] | None:
    """The config of a servable Qwen3 checkpoint in `model_dir`, else None."""
    try:
        if not (model_dir / "tokenizer.json").is_file():
            return None
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return None
    if not any(model_dir.glob("*.safetensors")):
        return None
    return config


def _hf_snapshot(repo: Path) -> Path | None:
    """The revision refs/main names, else the newest snapshot that is a checkpoint."""
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text().strip()
        if main and checkpoint_config(snapshots / main) is not None:
            return snapshots / main
    except OSError:
        pass
    try:
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    return next((p for p in candidates if checkpoint_config(p) is not None), None)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def scan(root: Path) -> list[CatalogEntry]:
    """The checkpoints under `root`, in the layouts the module docstring lists."""
    found: list[tuple[str, Path, str]] = []  # (name, directory, publisher)
    for child in _subdirs(root):
        if child.name.startswith(HF_REPO_PREFIX):
            org, _, name = child.name[len(HF_REPO_PREFIX) :].partition("--")
            snapshot = _hf_snapshot(child)
            if snapshot is not None and org and name:
                found.append((f"{org}/{name}", snapshot, org))
        elif checkpoint_config(child) is not None:
            found.append((child.name, child, "local"))
        else:
            found += [(f"{child.name}/{g.name}", g, child.name) for g in _subdirs(child)]
    entries = []
    for name, directory, publisher in found:
        config = checkpoint_config(directory)
        if config is None:
            continue
        kind = "embeddings" if is_embedding_checkpoint(directory, config) else "llm"
        entries.append(
            CatalogEntry(
                id=name,
                path=directory,
                source=str(directory),
                config=config,
                kind=kind,
                publisher=publisher,
                files=_weights(directory),
            )
        )
    return entries


class ModelCatalog:
    """`pinned`: the --model checkpoints (always listed); `dirs`: the model directories."""

    def __init__(self, dirs: list[Path], pinned: list[CatalogEntry] = ()):
        self.dirs = list(dirs)
        self.pinned = list(pinned)
        self._scanned: dict[str, CatalogEntry] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()  # listings may scan from FastAPI's worker threads

    @property
    def any_name(self) -> bool:
        """One model, and no directory holds it (--model, or the demo model): every name is that
        model, as in LM Studio with one model loaded."""
        entries = self.entries()
        return len(entries) == 1 and not entries[0].scanned

    def entries(self) -> list[CatalogEntry]:
        """Pinned entries first, then the directories' (a name the first holder keeps)."""
        with self._lock:
            if self.dirs and time.monotonic() - self._scanned_at > RESCAN_SECONDS:
                self._rescan()
            scanned = list(self._scanned.values())
        return self.pinned + [e for e in scanned if e.id not in {p.id for p in self.pinned}]

    def _rescan(self) -> None:
        known = self._scanned
        self._scanned = {}
        for root in self.dirs:
            for entry in scan(root):
                if entry.id in self._scanned:
                    continue
                previous = known.get(entry.id)
                if previous is not None and previous.path == entry.path:
                    entry = previous  # keep its measured size and parameter count
                self._scanned[entry.id] = entry
        self._scanned_at = time.monotonic()

    def find(self, name: str) -> CatalogEntry | None:
        """The entry `name` names: its id exactly, case-insensitively, or the id's last part."""
        entries = self.entries()
        by_id = {e.id: e for e in entries}
        if name in by_id:
            return by_id[name]
        lowered = name.lower()
        exact = [e for e in entries if e.id.lower() == lowered]
        if exact:
            return exact[0]
        tails = [e for e in entries if e.id.lower().rsplit("/", 1)[-1] == lowered]
        return tails[0] if len(tails) == 1 else None


def demo_entry() -> CatalogEntry | None:
    """The built-in demo model, when no --model is given and no directory holds a model."""
    from ..assets import DEMO_MODEL_PATH, demo_model_available

    if not demo_model_available():
        return None
    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    return CatalogEntry(
        id=DEMO_MODEL_ID,
        path=DEMO_MODEL_PATH,
        source=str(DEMO_MODEL_PATH),
        config=config,
        kind="llm",
        scanned=False,
        files=_weights(DEMO_MODEL_PATH),
    )

"""The models a server holds: loading, the names clients use, and what LM Studio reports about them.

A checkpoint is served either as a chat model (causal LM) or as an embedding model. Qwen3-Embedding
checkpoints have the same architecture, so they are recognised by their files: sentence-transformers'
`modules.json` / `config_sentence_transformers.json`, or a bare-body `architectures` entry
("Qwen3Model"). `--embedding` forces it for a checkpoint that carries neither.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from ..cache import enable_long_context, make_cache
from ..config import generation_config as read_generation_config
from ..config import load_config
from ..errors import ConfigError, GenerationError
from ..generation.speculative import DraftModel, PromptLookup
from ..hub import resolve_model_path
from ..loading import model_from_config, prepare_for_inference, quantization_of
from ..model import Model
from ..tokenizer import Tokenizer, load_tokenizer

EMBEDDING_MARKERS = ("modules.json", "config_sentence_transformers.json")
DEMO_MODEL_ID = "qwen3-mlx-demo"


@dataclass
class Drafting:
    """--draft-model or --prompt-lookup: how a request that decodes alone drafts tokens for the
    model to check (generation/speculative.py; with other requests running, the batch decodes
    as usual)."""

    num_draft_tokens: int
    draft: Any = None  # a loaded draft model (its vocabulary checked against the model's)
    name: str = ""  # what LM Studio's stats call it (the draft, or prompt-lookup-N)
    prompt_lookup: int | None = None

    def drafter(self, model: Any) -> DraftModel | PromptLookup:
        """A request's own drafter (a draft model keeps a KV cache per sequence)."""
        if self.draft is not None:
            return DraftModel(self.draft, model)
        return PromptLookup(self.prompt_lookup)


class ConfigFacts:
    """What a checkpoint's config.json says of it in model listings (a served model and a
    catalog entry alike)."""

    config: dict[str, Any]

    @property
    def arch(self) -> str:
        return str(self.config.get("model_type", "qwen3"))

    @property
    def quantization(self) -> str:
        return quantization_label(self.config)


@dataclass
class LoadedModel(ConfigFacts):
    id: str
    path: Path
    model: Model
    tokenizer: Tokenizer
    config: dict[str, Any]
    kind: str  # "llm" | "embeddings"
    context_length: int
    publisher: str = "local"
    generation_config: dict[str, Any] = field(default_factory=dict)
    kv_bits: int | None = None  # --kv-bits: every request's KV cache quantized to this many bits
    kv_group_size: int = 64
    # --max-kv-size: while generating, each request attends to its first tokens and its latest
    # ones, this many in all (the batch's slots.py windows); its prompt is read whole.
    max_kv_size: int | None = None
    drafting: Drafting | None = None

    def new_cache(self) -> list[Any]:
        """An empty KV cache for one request's prompt (plain, or quantized with --kv-bits)."""
        return make_cache(self.model, self.kv_bits, self.kv_group_size)

    @property
    def capabilities(self) -> list[str]:
        return capabilities_of(self.kind)

    @cached_property
    def weights_bytes(self) -> int:
        """The memory its weights take (arrays' sizes are metadata: nothing is evaluated)."""
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.tokenizer.eos_token_ids)
        ids.update(_as_list(self.generation_config.get("eos_token_id")))
        end_of_text = self.tokenizer.token_to_id("<|endoftext|>")
        if end_of_text is not None:
            ids.add(end_of_text)  # ends raw completions too
        return ids


def quantization_label(config: dict[str, Any]) -> str:
    """LM Studio's name for a checkpoint's precision: `4bit`, `bf16`, `fp32`…"""
    quant = quantization_of(config)
    if quant and "bits" in quant:
        return f"{quant['bits']}bit"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def capabilities_of(kind: str) -> list[str]:
    return ["tool_use", "structured_output", "reasoning"] if kind == "llm" else []


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def is_embedding_checkpoint(model_dir: Path, config: dict[str, Any]) -> bool:
    if any((model_dir / name).exists() for name in EMBEDDING_MARKERS):
        return True
    return any(not a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def context_length_of(config: dict[str, Any]) -> int:
    length = int(config.get("max_position_embeddings") or 40960)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and scaling.get("factor"):
        original = scaling.get("original_max_position_embeddings") or length
        length = max(length, int(original * float(scaling["factor"])))
    return length


def model_id_for(path_or_id: str) -> str:
    """The name `/v1/models` lists: a hub id as given, a directory by its (lowercased) name."""
    from ..assets import DEMO_MODEL_PATH

    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.resolve() == DEMO_MODEL_PATH:
            return DEMO_MODEL_ID
        return path.resolve().name.lower()
    return str(path_or_id)


def served_model_directory(path_or_id: str, parallel: str | None = None) -> Path:
    """Where config, tokenizer and weights are read (under --parallel: this rank's folder of a
    pre-split checkpoint)."""
    if parallel:
        from .. import distributed

        return distributed.model_directory(path_or_id, parallel)
    return resolve_model_path(path_or_id)


def is_embedding_model(path_or_id: str, parallel: str | None = None) -> bool:
    model_dir = served_model_directory(path_or_id, parallel)
    return is_embedding_checkpoint(model_dir, load_config(model_dir))


def load_served_model(
    path_or_id: str,
    *,
    embedding: bool | None = None,
    context_length: int | None = None,
    model_id: str | None = None,
    parallel: str | None = None,
    long_context: bool = False,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    max_kv_size: int | None = None,
) -> LoadedModel:
    """`parallel`: under mlx.launch, load this rank's shard of a chat model (embedding models
    are never split: pass None for them). `long_context`: YaRN to 131,072 tokens, as the CLI's
    `--long-context` (a checkpoint that already scales its RoPE is left as it is)."""
    model_dir = served_model_directory(path_or_id, parallel)
    config = load_config(model_dir)
    if embedding is None:
        embedding = is_embedding_checkpoint(model_dir, config)
    if long_context and not embedding:
        if parallel:
            raise ConfigError("--long-context: not with --parallel")
        config = enable_long_context(config)
    if parallel and not embedding:
        from .. import distributed

        model = distributed.load_sharded(path_or_id, parallel)[0]
    else:
        model = model_from_config(model_dir, config, body_only=embedding)
    if not embedding:
        prepare_for_inference(model)
    tokenizer = load_tokenizer(model_dir)
    native = context_length_of(config)
    if context_length is not None and context_length < 1:
        raise ConfigError(f"--context-length {context_length}: must be positive")
    generation_config = read_generation_config(model_dir)
    path = Path(path_or_id).expanduser()
    loaded = LoadedModel(
        id=model_id or model_id_for(path_or_id),
        path=model_dir,
        model=model,
        tokenizer=tokenizer,
        config=config,
        kind="embeddings" if embedding else "llm",
        context_length=context_length or native,
        publisher="local" if path.exists() else str(path_or_id).split("/")[0],
        generation_config=generation_config,
        kv_bits=None if embedding else kv_bits,
        kv_group_size=kv_group_size,
        max_kv_size=None if embedding else max_kv_size,
    )
    if loaded.kind == "llm":
        try:  # the Python API's rules for these options, and its messages
            make_cache(loaded.model, loaded.kv_bits, kv_group_size, loaded.max_kv_size)
        except GenerationError as e:  # one line naming the option and the value
            message = str(e).replace("kv_bits", "--kv-bits").replace("max_kv_size", "--max-kv-size")
            raise ConfigError(message.replace("kv_group_size", "--kv-group-size")) from None
    return loaded


class ModelNotFound(LookupError):
    pass


class ModelRegistry:
    """Name → loaded model. Models come and go while the server runs (loader.py adds and removes
    them on the event loop); readers in worker threads iterate a snapshot.

    `any_name`: with one model loaded, every name is served by it (LM Studio does this). The
    loader turns it off when the server has model directories: then a name must be one of theirs.
    """

    def __init__(self, models: list[LoadedModel], *, allow_empty: bool = False):
        if not models and not allow_empty:
            raise ConfigError("no model to serve")
        self.models: dict[str, LoadedModel] = {}
        self.loads: Counter[str] = Counter()  # loads per model id (GET /metrics)
        self.any_name = True
        for m in models:
            if m.id in self.models:
                raise ConfigError("two --model arguments resolve to the same name")
            self.add(m)

    def add(self, model: LoadedModel) -> None:
        self.models[model.id] = model
        self.loads[model.id] += 1

    def remove(self, model_id: str) -> LoadedModel | None:
        return self.models.pop(model_id, None)

    def __iter__(self):
        return iter(list(self.models.values()))

    def __len__(self):
        return len(self.models)

    def find(self, name: str) -> LoadedModel | None:
        """The model `name` names: exactly, or in a hub-style or case-insensitive spelling."""
        if name in self.models:
            return self.models[name]
        lowered = name.lower()
        for m in list(self.models.values()):
            if lowered in (m.id.lower(), m.id.lower().split("/")[-1]):
                return m
        return None

    def get(self, name: str | None, kind: str | None = None) -> LoadedModel:
        models = list(self.models.values())
        candidates = [m for m in models if kind is None or m.kind == kind]
        found = self.find(name) if name else None
        if found is not None:
            return found
        if len(models) == 1 and (self.any_name or not name):
            return models[0]
        if not name and len(candidates) == 1:
            return candidates[0]
        names = ", ".join(sorted(self.models)) or "none"
        raise ModelNotFound(
            f"model {name!r} is not loaded; loaded: {names}"
            if name
            else f"several models are loaded ({names}): name one in 'model'"
            if models
            else "no model is loaded: name one in 'model' (GET /v1/models lists them)"
        )

"""Qwen3 (dense and MoE) on MLX.

    from qwen3_mlx import load, generate, stream_generate, Chat

    model, tokenizer = load("Qwen/Qwen3-0.6B")          # a directory or a hub id
    print(generate(model, tokenizer, messages=[{"role": "user", "content": "Hi"}]).content)

Names are imported on first use, so `import qwen3_mlx` stays cheap. `qwen3_mlx.generate`
is the function (as in mlx-lm); the module of the same name is
`sys.modules["qwen3_mlx.generate"]` (or `from qwen3_mlx.generate import ...`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"


def _defer_mlx_lm_init() -> None:
    """Let `import mlx_lm.models.cache` skip running mlx_lm/__init__.py until it is needed.

    We use mlx-lm's cache and attention modules, which import only mlx. Its package
    __init__ imports mlx_lm.generate/convert/utils and through them transformers: ~6 s
    before `qwen3-mlx chat` can even start loading a model. So the package module is
    registered with its path but without running its body; the first access to any name
    it defines (`mlx_lm.load`, `from mlx_lm import generate`, ...) runs the body in place,
    after which it is the ordinary package. Nothing happens if mlx_lm is already imported.
    """
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)  # attributes set, body not run

    def run_body(name: str):
        del package.__getattr__  # from now on an ordinary module
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = run_body
    sys.modules["mlx_lm"] = package


_defer_mlx_lm_init()

# public name -> module that defines it
_EXPORTS = {
    "load": "loading",
    "load_model": "loading",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResult": "generation",
    "GenerationResponse": "generation",
    "GenerationStats": "generation",
    "Sequence": "generation",
    "prepare_prompt": "generation",
    "Chat": "chat",
    "ChatReply": "chat",
    "SamplingParams": "sampling",
    "make_sampler": "sampling",
    "make_cache": "cache",
    "PromptCache": "cache",
    "save_prompt_cache": "cache",
    "load_prompt_cache": "cache",
    "enable_long_context": "cache",
    "load_tokenizer": "tokenizer",
    "render_chat": "template",
    "parse_output": "parsing",
    "Qwen3MLXError": "errors",
    "GenerationError": "errors",
    "DEMO_MODEL_PATH": "assets",
    "DEMO_DRAFT_PATH": "assets",
}

__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'qwen3_mlx' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule `qwen3_mlx.generate` makes Python set the package
        # attribute `generate` to that module; keep the public function there instead.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package

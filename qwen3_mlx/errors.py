"""One error type per area. Each message names the file, field or value at fault.

Command-line entry points catch `Qwen3MLXError` and print its message as a single
line; the server turns it into an OpenAI-style error object. Anything else that
escapes is a bug in this package, not the user's input.
"""


class Qwen3MLXError(Exception):
    """Base class for errors caused by user input (files, flags, requests)."""


class ConfigError(Qwen3MLXError):
    """config.json is missing, malformed or describes another architecture."""


class WeightsError(Qwen3MLXError):
    """A safetensors shard is missing, truncated, corrupt or has the wrong shape."""


class ConvertError(Qwen3MLXError):
    """Bad converter flags or destination."""


class TokenizerError(Qwen3MLXError):
    """Tokenizer files are missing or unreadable."""


class TemplateError(Qwen3MLXError):
    """The chat template failed to render the given messages."""


class GenerationError(Qwen3MLXError):
    """Bad generation parameters (sampling values, budgets, prompt too long)."""


class EvaluateError(Qwen3MLXError):
    """Bad evaluator flags or data (`python -m qwen3_mlx.evaluate`)."""


class DistributedError(Qwen3MLXError):
    """A distributed job lost a rank or was launched inconsistently."""

"""The one generation core: what the Python API and the server's engine both run.

prompt.py    messages / raw text → tokens and the reply's starting state; generation_config
sequence.py  Sequence: one request's state (stops, thinking, grammar gate, finish reason)
step.py      the model seam (forward, prefill) and the batched sampling step
loop.py      the single-request loop and the Python API (generate, stream_generate)
speculative.py  draft_model / prompt_lookup: the same tokens from fewer passes of the model
"""

from .loop import (
    DEFAULT_PREFILL_STEP_SIZE,
    GenerationResponse,
    GenerationResult,
    GenerationStats,
    generate,
    result_of,
    start_request,
    stream_generate,
    stream_sequence,
)
from .prompt import Prompt, PromptState, generation_config, prepare_prompt
from .sequence import FinishReason, Sequence, SequenceOutput, TokenLogprob
from .step import (
    Sampled,
    SamplingStep,
    forward,
    generation_stream,
    prefill,
    wired_limit,
)

__all__ = [
    "DEFAULT_PREFILL_STEP_SIZE",
    "FinishReason",
    "GenerationResponse",
    "GenerationResult",
    "GenerationStats",
    "Prompt",
    "PromptState",
    "Sampled",
    "SamplingStep",
    "Sequence",
    "SequenceOutput",
    "TokenLogprob",
    "forward",
    "generate",
    "generation_config",
    "generation_stream",
    "prefill",
    "prepare_prompt",
    "result_of",
    "start_request",
    "stream_generate",
    "stream_sequence",
    "wired_limit",
]

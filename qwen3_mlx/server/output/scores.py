"""What replies need from the model besides generation, run on the engine thread (`Engine.call`,
the only thread that may touch MLX): embeddings, and the prompt's logprobs for an echo.

Both are functions of the weights alone, with caches of their own: they never touch the running
batch, and one call does a bounded piece of work, so decoding goes on between calls.
"""

from __future__ import annotations

import numpy as np

from ..models import LoadedModel

# Prompt tokens scored per engine call: their logits (tokens x vocabulary, float32) are the
# call's peak memory, ~150 MB for Qwen3's vocabulary.
SCORE_CHUNK = 256


def embed_tokens(
    model: LoadedModel, batches: list[list[int]], dimensions: int | None
) -> list[np.ndarray]:
    """Last-token pooling of the final-normed hidden states, L2-normalised (Qwen3-Embedding)."""
    import mlx.core as mx

    out = []
    for tokens in batches:
        hidden = model.model.model(mx.array([tokens]))[0, -1].astype(mx.float32)
        if dimensions is not None:
            hidden = hidden[:dimensions]  # Matryoshka: a prefix of the vector is an embedding too
        hidden = hidden / mx.maximum(mx.linalg.norm(hidden), 1e-12)
        out.append(np.array(hidden))
    return out


def can_score(model: LoadedModel) -> bool:
    """Under --parallel the model runs in lockstep on every rank, inside the engine's turns
    only: rank 0 can't run it alone, so an echo's prompt logprobs stay null there."""
    distributed = getattr(model.model, "distributed", None)
    return distributed is None or distributed.size <= 1


class PromptScorer:
    """Each prompt token's logprob given the tokens before it (and the `top_n` best there), from
    the second token on; `step()` scores the next SCORE_CHUNK positions and says if it is done."""

    def __init__(self, model: LoadedModel, prompt: list[int], top_n: int):
        self.model, self.prompt, self.top_n = model, prompt, top_n
        self.cache = None
        self.done = 0  # positions scored: they predict prompt[1 : done + 1]
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []

    @property
    def finished(self) -> bool:
        return self.done >= len(self.prompt) - 1

    def step(self) -> bool:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        from ...sampling import gather_logprobs, log_softmax

        if self.finished:
            return True
        net = self.model.model
        if self.cache is None:
            self.cache = [KVCache() for _ in net.layers]
        end = min(self.done + SCORE_CHUNK, len(self.prompt) - 1)
        hidden = net.model(mx.array([self.prompt[self.done : end]]), self.cache)
        logprobs = log_softmax(net.logits(hidden[0]).astype(mx.float32))
        targets = mx.array(self.prompt[self.done + 1 : end + 1])
        chosen, ids, values = gather_logprobs(logprobs, targets, self.top_n)
        mx.eval([a for a in (chosen, ids, values) if a is not None], [c.state for c in self.cache])
        self.logprobs += chosen.tolist()
        if ids is not None:
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True):
                self.top.append(list(zip(row_ids, row_values, strict=True)))
        self.done = end
        if self.finished:
            self.cache = None  # free the KV memory now
        return self.finished

    def scores(self) -> tuple[list[float], list[list[tuple[int, float]]]]:
        return self.logprobs, self.top

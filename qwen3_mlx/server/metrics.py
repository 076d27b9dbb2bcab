"""GET /metrics: the server's load and latency in Prometheus' text format (prometheus_client).

Counted as requests end (the engine calls `finished` with each request's `Finished`): requests
by model and finish reason, prompt, generated and prefix-cached tokens, time to first token and
time per output token. Read at each scrape: requests running, prefilling and queued, requests
that failed or whose client left, decode steps, loaded models and their weights' bytes (models
come and go: loader.py), loads per model, and MLX's memory.
"""

from __future__ import annotations

import mlx.core as mx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from .jobs import Finished

PREFIX = "qwen3_mlx"
# Seconds. TTFT spans a cached prompt on a fast GPU to a long prefill on a CPU; a token's time
# from a batched GPU step (a few ms) to a CPU one (tens of ms).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    def __init__(self, engine, models) -> None:
        self.engine = engine
        self.models = models
        self.registry = CollectorRegistry(auto_describe=True)
        by_model = ["model"]
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests finished, by finish reason (stop, length, tool_calls, abort)",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", by_model,
            registry=self.registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated (reasoning included)", by_model,
            registry=self.registry,
        )  # fmt: skip
        self.prefix_hits = Counter(
            f"{PREFIX}_prefix_cache_hits", "Requests whose prompt started from a cached prefix",
            by_model, registry=self.registry,
        )  # fmt: skip
        self.prefix_tokens = Counter(
            f"{PREFIX}_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache",
            by_model, registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From arrival to the first token",
            by_model, buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "A request's generation time over its tokens after the first",
            by_model, buckets=TPOT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_Engine(engine, models))

    def finished(self, model: str, done: Finished) -> None:
        """One request's end (called on the engine thread; prometheus_client is thread-safe)."""
        self.requests.labels(model, done.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.generation_tokens.labels(model).inc(done.completion_tokens)
        if done.cached_tokens:
            self.prefix_hits.labels(model).inc()
            self.prefix_tokens.labels(model).inc(done.cached_tokens)
        if done.completion_tokens:
            self.ttft.labels(model).observe(done.time_to_first_token)
        if done.completion_tokens > 1:
            per_token = done.generation_time / (done.completion_tokens - 1)
            self.tpot.labels(model).observe(per_token)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Engine:
    """The engine's and models' state, read at scrape time."""

    def __init__(self, engine, models) -> None:
        self.engine = engine
        self.models = models  # the ModelRegistry: the models loaded now, and loads so far

    def collect(self):
        stats = self.engine.stats()
        for name, doc in (
            ("running", "Requests decoding"),
            ("prefilling", "Requests reading their prompt"),
            ("queued", "Requests waiting for a slot"),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_requests_{name}", doc, value=stats[name])
        for name, doc in (
            ("failed", "Requests ended by an error in the engine"),
            ("cancelled", "Requests whose client left before they finished"),
            ("decode_steps", "Decode steps the engine ran"),
        ):
            value = stats["steps" if name == "decode_steps" else name]
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "Models loaded (1 each)", labels=["model", "kind"]
        )
        weights = GaugeMetricFamily(
            f"{PREFIX}_model_weights_bytes", "Bytes of a loaded model's weights", labels=["model"]
        )
        for m in self.models:
            loaded.add_metric([m.id, m.kind], 1)
            weights.add_metric([m.id], m.weights_bytes)
        yield loaded
        yield weights
        loads = CounterMetricFamily(
            f"{PREFIX}_model_loads",
            "Times a model was loaded (at start or on demand)",
            labels=["model"],
        )
        for model_id, count in sorted(getattr(self.models, "loads", {}).items()):
            loads.add_metric([model_id], count)
        yield loads
        yield GaugeMetricFamily(
            f"{PREFIX}_memory_active_bytes", "MLX's memory in use", value=mx.get_active_memory()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_memory_peak_bytes", "MLX's peak memory", value=mx.get_peak_memory()
        )

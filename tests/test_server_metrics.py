"""GET /metrics on a real server: Prometheus' text format, read with prometheus_client's own
parser; the counters move as requests run, the gauges show a request while it decodes."""

from __future__ import annotations

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

GREEDY = {"temperature": 0}


def scrape(server) -> dict[str, float]:
    """Sample name → value, summed over labels (other tests share this server)."""
    response = httpx.get(server.base + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_counters_move_as_requests_run(demo_server, demo_conversations):
    api = OpenAI(base_url=demo_server.v1, api_key="lm-studio", max_retries=0, timeout=120)
    before = scrape(demo_server)
    assert before["qwen3_mlx_model_loaded"] >= 1 and before["qwen3_mlx_model_weights_bytes"] > 0
    # A long system prompt, twice: the second request reads it from the prefix cache.
    system = "You are a careful assistant. " * 12
    hello = demo_conversations["hello"]["messages"]
    replies = [
        api.chat.completions.create(
            model="demo", messages=[{"role": "system", "content": system}, *hello], **GREEDY
        )
        for _ in range(2)
    ]
    after = scrape(demo_server)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prompt = sum(r.usage.prompt_tokens for r in replies)
    generated = sum(r.usage.completion_tokens for r in replies)
    assert moved("qwen3_mlx_requests_total") >= 2
    assert moved("qwen3_mlx_prompt_tokens_total") >= prompt
    assert moved("qwen3_mlx_generation_tokens_total") >= generated
    assert moved("qwen3_mlx_time_to_first_token_seconds_count") >= 2
    assert moved("qwen3_mlx_time_to_first_token_seconds_sum") > 0
    assert moved("qwen3_mlx_time_per_output_token_seconds_count") >= 2
    assert moved("qwen3_mlx_prefix_cache_hits_total") >= 1
    assert moved("qwen3_mlx_prefix_cache_hit_tokens_total") >= 16
    assert moved("qwen3_mlx_decode_steps_total") >= generated - 2
    assert after["qwen3_mlx_memory_active_bytes"] > 0


def test_a_decoding_request_is_counted_while_it_runs(demo_server):
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 10."}],
        "stream": True,
        "max_tokens": 400,
        "logit_bias": {"151645": -100, "151643": -100},  # never ends by itself
    }
    with httpx.stream("POST", demo_server.v1 + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        during = scrape(demo_server)
        r.close()
    assert during["qwen3_mlx_requests_running"] >= 1

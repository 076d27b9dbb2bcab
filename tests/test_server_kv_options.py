"""`--kv-bits` (every request's KV cache quantized, concurrent requests batched in quantized slots)
and `--max-kv-size` (replies far longer than the window); the batch's exactness for both is
tests/test_server_engine.py's. A bad value is one line at start-up."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from convert.qwen_tokenizer import build_qwen3_tokenizer
from tests.checkpoints import make_checkpoint
from tests.server_process import ROOT, ServerProcess

QWEN_VOCAB = 151_936


def ask(server, text: str, max_tokens: int = 16) -> dict:
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False},
            "logit_bias": {"151643": -100, "151645": -100},  # run to max_tokens
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_quantized_kv_cache_serves_concurrent_requests(tmp_path):
    model = make_checkpoint(tmp_path / "ckpt", head_dim=32, vocab_size=QWEN_VOCAB)
    build_qwen3_tokenizer(model)
    server = ServerProcess(["--model", str(model), "--kv-bits", "8", "--kv-group-size", "32"])
    try:
        alone = ask(server, "one")
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda t: ask(server, t), ["one", "two", "three", "four"]))
        for reply in [alone, *together]:
            assert reply["usage"]["completion_tokens"] == 16
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


def test_replies_longer_than_the_window(demo_model_dir):
    server = ServerProcess(["--model", str(demo_model_dir), "--max-kv-size", "40"])
    try:
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda t: ask(server, t, 120), ["one", "two"]))
        for reply in replies:
            assert reply["usage"]["completion_tokens"] == 120  # 3x the window
        alone = ask(server, "three", 100)["choices"][0]["message"]
        assert server.health()["status"] == "ok"
    finally:
        server.stop()
    # The Python API with the same window says the same; without one, something else.
    from qwen3_mlx import generate, load

    model, tokenizer = load(demo_model_dir)
    request = dict(
        messages=[{"role": "user", "content": "three"}],
        enable_thinking=False,
        max_tokens=100,
        temperature=0,
        logit_bias={151643: -100, 151645: -100},
    )
    windowed = generate(model, tokenizer, max_kv_size=40, **request)
    unbounded = generate(model, tokenizer, **request)
    assert alone.get("content") == windowed.content
    assert windowed.content != unbounded.content


@pytest.mark.parametrize(
    "args, named",
    [
        (["--kv-bits", "7"], "--kv-bits"),
        (["--max-kv-size", "3"], "--max-kv-size"),
        (["--kv-bits", "8", "--max-kv-size", "64"], "--kv-bits"),
    ],
)
def test_bad_cache_options_are_one_line(demo_model_dir, args, named):
    command = [sys.executable, "-m", "qwen3_mlx.server", "--model", str(demo_model_dir), *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], out.stderr
    assert "Traceback" not in out.stderr

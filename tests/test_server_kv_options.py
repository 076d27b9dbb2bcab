"""`--kv-bits`: every request's KV cache quantized, concurrent requests batched in quantized slots
(the batch's exactness is tests/test_server_engine.py's); a bad value is one line at start-up."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from convert.qwen_tokenizer import build_qwen3_tokenizer
from tests.checkpoints import make_checkpoint
from tests.server_process import ROOT, ServerProcess

QWEN_VOCAB = 151_936


def ask(server, text: str) -> dict:
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 16,
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


def test_bad_kv_bits_is_one_line(tmp_path, demo_model_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen3_mlx.server",
            "--model",
            str(demo_model_dir),
            "--kv-bits",
            "7",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--kv-bits" in errors[0] and "7" in errors[0], out.stderr
    assert "Traceback" not in out.stderr

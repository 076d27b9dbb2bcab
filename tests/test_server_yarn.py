"""Every checkpoint the Python API loads, the server serves: YaRN (how Qwen3 runs at 128K).

A config with `rope_scaling: {"rope_type": "yarn", ...}` used to fail every request in the server
(its RoPE periods were a lazy array made on the loading thread, which the engine thread could not
evaluate) while `/health` said ok. Here real server processes serve YaRN checkpoints: the demo
model (MLX, MoE) with YaRN in its config, `--long-context` on the plain demo, and tiny
transformers-made checkpoints (HF layout, dense and MoE, both config dialects).
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from convert.qwen_tokenizer import build_qwen3_tokenizer
from tests.checkpoints import YARN, make_checkpoint
from tests.server_process import ServerProcess

QWEN_VOCAB = 151_936
HELLO = [{"role": "user", "content": "Hello"}]


def chat(server, thinking: bool) -> dict:
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "model": "m",
            "messages": HELLO,
            "max_tokens": 12,
            "chat_template_kwargs": {"enable_thinking": thinking},
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def serve_and_chat(args: list[str]) -> list[dict]:
    server = ServerProcess(args)
    try:
        replies = [chat(server, thinking) for thinking in (True, False)]
        assert server.health()["status"] == "ok"
        return replies
    finally:
        server.stop()


def test_demo_model_with_yarn_in_its_config(tmp_path, demo_model_dir):
    model = tmp_path / "demo-yarn"
    shutil.copytree(demo_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": config["max_position_embeddings"],
    }
    (model / "config.json").write_text(json.dumps(config))
    thinking, plain = serve_and_chat(["--model", str(model)])
    assert thinking["choices"][0]["message"].get("reasoning_content")
    assert plain["choices"][0]["message"]["content"]


def test_long_context_switch(demo_model_dir):
    thinking, plain = serve_and_chat(["--model", str(demo_model_dir), "--long-context"])
    assert thinking["usage"]["completion_tokens"] > 0
    assert plain["choices"][0]["message"]["content"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("hub", [False, True], ids=["transformers5-config", "hub-config"])
def test_transformers_checkpoints_with_yarn(tmp_path, moe, hub):
    model = make_checkpoint(
        tmp_path / "ckpt", moe=moe, rope_scaling=YARN, hub_dialect=hub, vocab_size=QWEN_VOCAB
    )
    build_qwen3_tokenizer(model)  # the server streams byte-level BPE text
    config = json.loads((model / "config.json").read_text())
    if hub:
        assert config["rope_scaling"]["rope_type"] == "yarn"
    else:
        assert config["rope_parameters"]["rope_type"] == "yarn"
    for reply in serve_and_chat(["--model", str(model)]):
        assert reply["usage"]["completion_tokens"] > 0

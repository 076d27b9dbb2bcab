"""LM Studio 0.4's native REST API (`/api/v1`) against a real server: list, load, chat (streamed
and not), unload, and a chat that loads its model itself.

The server's --models-dir holds the demo model in LM Studio's layout (`<publisher>/<name>/`), so
its key is `lmstudio-community/qwen3-demo`; it starts with nothing loaded. Greedy replies equal
the demo conversations' recorded ones.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tests.server_process import ServerProcess

KEY = "lmstudio-community/qwen3-demo"


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmstudio-models")
    shutil.copytree(demo_model_dir, root / KEY)
    process = ServerProcess(["--models-dir", str(root), "--max-tokens-limit", "512"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def conv(demo_conversations):
    return demo_conversations


def api(server, path: str) -> str:
    return server.base + "/api/v1" + path


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(api(server, path), json=body, timeout=120)


def listed(server) -> dict:
    (model,) = httpx.get(api(server, "/models"), timeout=10).json()["models"]
    return model


def ask(record: dict, **extra) -> dict:
    """A demo conversation (one user message) as a /api/v1/chat request, greedy."""
    (message,) = record["messages"]
    reasoning = "on" if record["enable_thinking"] else "off"
    return {"model": KEY, "input": message["content"], "temperature": 0, "reasoning": reasoning,
            **extra}  # fmt: skip


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """The SSE stream as (event name, data), checking each data's type names its event."""
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


def test_models_lists_the_checkpoint_unloaded(server):
    model = listed(server)
    assert model["key"] == KEY and model["publisher"] == "lmstudio-community"
    assert model["type"] == "llm" and model["format"] == "mlx"
    assert model["display_name"] == "qwen3-demo" and model["architecture"] == "qwen3_moe"
    assert model["quantization"] == {"name": "4bit", "bits_per_weight": 4.0}
    assert model["loaded_instances"] == [] and model["max_context_length"] == 4096
    assert model["size_bytes"] > 0 and model["params_string"].endswith("M")
    reasoning = model["capabilities"]["reasoning"]
    assert reasoning["default"] == "on" and set(reasoning["allowed_options"]) == {
        "off", "on", "low", "medium", "high"
    }  # fmt: skip


def test_load_chat_and_unload(server, conv):
    r = post(
        server, "/models/load", {"model": KEY, "context_length": 2048, "echo_load_config": True}
    )
    assert r.status_code == 200, r.text
    loaded = r.json()
    assert loaded["type"] == "llm" and loaded["instance_id"] == KEY
    assert loaded["status"] == "loaded" and loaded["load_time_seconds"] > 0
    assert loaded["load_config"] == {"context_length": 2048}
    (instance,) = listed(server)["loaded_instances"]
    assert instance["id"] == KEY and instance["config"]["context_length"] == 2048
    again = post(server, "/models/load", {"model": KEY}).json()
    assert again["load_time_seconds"] == 0 and "load_config" not in again
    other = post(server, "/models/load", {"model": KEY, "context_length": 1024})
    assert other.status_code == 400 and other.json()["error"]["param"] == "context_length"

    # Thinking: a reasoning item, then the message (the model was loaded: no load time).
    record = conv["capital"]
    reply = post(server, "/chat", ask(record)).json()
    assert reply["model_instance_id"] == KEY and "response_id" not in reply
    assert reply["output"] == [
        {"type": "reasoning", "content": record["reasoning"]},
        {"type": "message", "content": record["content"]},
    ]
    stats = reply["stats"]
    assert stats["input_tokens"] > 0 and stats["reasoning_output_tokens"] > 0
    assert stats["total_output_tokens"] > stats["reasoning_output_tokens"]
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token_seconds"] > 0
    assert "model_load_time_seconds" not in stats

    off = conv["capital.thinking_off"]
    plain = post(server, "/chat", ask(off)).json()
    assert plain["output"] == [{"type": "message", "content": off["content"]}]
    assert plain["stats"]["reasoning_output_tokens"] == 0

    # Streamed: the same result, as events.
    r = post(server, "/chat", ask(record, stream=True))
    assert r.headers["content-type"].startswith("text/event-stream")
    stream = events(r)
    names = [name for name, _ in stream]
    assert names[:3] == ["chat.start", "prompt_processing.start", "prompt_processing.end"]
    assert names[-1] == "chat.end" and "error" not in names
    squeezed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert squeezed[3:] == [
        "reasoning.start", "reasoning.delta", "reasoning.end",
        "message.start", "message.delta", "message.end", "chat.end",
    ]  # fmt: skip
    text = {
        kind: "".join(d["content"] for n, d in stream if n == f"{kind}.delta")
        for kind in ("reasoning", "message")
    }
    assert text == {"reasoning": record["reasoning"], "message": record["content"]}
    result = stream[-1][1]["result"]
    assert result["output"] == reply["output"] and stream[0][1]["model_instance_id"] == KEY

    r = post(server, "/models/unload", {"instance_id": KEY})
    assert r.status_code == 200 and r.json() == {"instance_id": KEY}
    assert listed(server)["loaded_instances"] == []
    gone = post(server, "/models/unload", {"instance_id": KEY})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "instance_id"


def test_a_chat_loads_its_model(server, conv):
    assert listed(server)["loaded_instances"] == []
    record = conv["colors.thinking_off"]
    stream = events(post(server, "/chat", ask(record, stream=True, context_length=3000)))
    names = [name for name, _ in stream]
    assert names[:4] == [
        "chat.start",
        "model_load.start",
        "model_load.end",
        "prompt_processing.start",
    ]
    assert stream[2][1]["load_time_seconds"] > 0
    result = stream[-1][1]["result"]
    assert result["output"] == [{"type": "message", "content": record["content"]}]
    assert result["stats"]["model_load_time_seconds"] == stream[2][1]["load_time_seconds"]
    (instance,) = listed(server)["loaded_instances"]
    assert instance["config"]["context_length"] == 3000  # the chat's, as it loaded the model
    # A level is a thinking budget: the think block is closed early, the answer is the same.
    hello = conv["hello"]
    low = post(server, "/chat", ask(hello, reasoning="low", max_output_tokens=40)).json()
    reasoning, message = low["output"]
    assert 0 < len(reasoning["content"]) < len(hello["reasoning"])
    assert message["content"] == hello["content"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": KEY, "input": "hi", "integrations": ["mcp/playwright"]}, 400, "integrations"),
        ({"model": KEY, "input": "hi", "previous_response_id": "resp_1"}, 400, None),
        ({"model": KEY, "input": [{"type": "image", "data_url": "data:,"}]}, 400, "input.0"),
        ({"model": KEY, "input": "hi", "reasoning": "max"}, 400, "reasoning"),
        ({"model": "qwen3-8b", "input": "hi"}, 404, "model"),
        ({"model": "../qwen3-demo", "input": "hi"}, 404, "model"),
    ],
)
def test_chat_errors(server, body, status, param):
    r = post(server, "/chat", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error

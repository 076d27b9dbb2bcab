"""MCP tools the server runs (issue #19): a real server on the demo model with an mcp.json.

The demo model was trained (convert/train_demo_model.py) to call mcp-server-time's
`get_current_time` for "What time is it in Tokyo?" and to answer its result with the result's
day of the week ("It is Tuesday in Tokyo."), so the whole loop runs offline: the model's call, the server running the real
mcp-server-time (started with this Python: no uvx, no network), the result as a `tool`
message, the answer. The faulty servers (tests/mcp_faulty_server.py) offer the same tool, so
the model calls them too: one raises, one sleeps past --mcp-timeout, one dies mid-call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.server_process import ROOT, ServerProcess, free_port

pytest.importorskip("mcp", reason="pip install mcp")
pytest.importorskip("mcp_server_time", reason="pip install mcp-server-time")

FAULTY = str(ROOT / "tests" / "mcp_faulty_server.py")
TIMEOUT = 2.0
QUESTION = "What time is it in Tokyo?"


def time_server() -> dict:
    # --local-timezone pins the zone its tool descriptions name: the prompt the demo learned.
    return {
        "command": sys.executable,
        "args": ["-m", "mcp_server_time", "--local-timezone", "Etc/UTC"],
    }


def faulty(mode: str) -> dict:
    return {"command": sys.executable, "args": [FAULTY, mode]}


def write_config(path: Path, servers: dict) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    config = write_config(
        tmp_path_factory.mktemp("mcp") / "mcp.json",
        {
            "time": time_server(),
            "broken": faulty("raise"),
            "slow": faulty("sleep"),
            "gone": faulty("exit"),
        },
    )
    proc = ServerProcess(
        [
            "--model", str(demo_model_dir), "--max-tokens-limit", "256",
            "--mcp-config", str(config), "--mcp-timeout", str(TIMEOUT), "--mcp-max-calls", "2",
        ]
    )  # fmt: skip
    yield proc
    proc.stop()


def chat(server, servers: list[str], **extra) -> httpx.Response:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "mcp": {"servers": servers},
        **extra,
    }
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def day_of(result: str) -> str:
    """The day of the week of mcp-server-time's result (what the demo's answer quotes)."""
    return json.loads(result)["day_of_week"]


def sse_events(text: str) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_lists_the_servers_and_their_tools(server, demo_conversations):
    listing = httpx.get(server.base + "/api/v1/mcp", timeout=10).json()
    servers = {s["name"]: s for s in listing["servers"]}
    assert set(servers) == {"time", "broken", "slow", "gone"}
    assert servers["time"]["state"] == "ready" and servers["time"]["transport"] == "stdio"
    tools = {t["name"]: t for t in servers["time"]["tools"]}
    assert set(tools) == {"get_current_time", "convert_time"}
    # What the server offers the model is what the demo learned, byte for byte.
    trained = demo_conversations["time_call"]["tools"]
    assert [t["function"]["parameters"] for t in trained] == [
        tools[t["function"]["name"]]["input_schema"] for t in trained
    ]
    assert listing["timeout_seconds"] == TIMEOUT and listing["max_calls"] == 2
    schema = httpx.get(server.base + "/openapi.json", timeout=10).json()
    assert "/api/v1/mcp" in schema["paths"]
    assert "mcp" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_the_server_runs_the_tool_and_the_answer_carries_its_result(server):
    reply = chat(server, ["time"])
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    (call,) = choice["message"]["mcp_calls"]
    assert (call["server"], call["name"]) == ("time", "get_current_time")
    assert json.loads(call["arguments"]) == {"timezone": "Asia/Tokyo"}
    assert not call["is_error"]
    assert json.loads(call["content"])["timezone"] == "Asia/Tokyo"
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]  # run by the server: not the client's to run
    assert choice["message"]["content"] == f"It is {day_of(call['content'])} in Tokyo."
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > 400  # both turns' prompts count


def test_streamed_the_call_then_its_result_then_the_answer(server):
    reply = chat(server, ["time"], stream=True)
    assert reply.status_code == 200
    deltas = [c["choices"][0]["delta"] for c in sse_events(reply.text) if c["choices"]]
    kinds = []
    for d in deltas:
        kind = "result" if d.get("role") == "tool" else "call" if d.get("tool_calls") else None
        kind = kind or ("content" if d.get("content") else None)
        if kind and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    assert kinds == ["call", "result", "content"]
    (result,) = [d for d in deltas if d.get("role") == "tool"]
    header = next(d["tool_calls"][0] for d in deltas if d.get("tool_calls"))
    assert result["tool_call_id"] == header["id"] and result["name"] == "get_current_time"
    assert not result["is_error"]
    answer = "".join(d.get("content") or "" for d in deltas if d.get("role") != "tool")
    assert answer == f"It is {day_of(result['content'])} in Tokyo."


def test_lmstudio_integrations(server):
    body = {"model": "demo", "input": QUESTION, "integrations": ["mcp/time"], "temperature": 0}
    reply = httpx.post(server.base + "/api/v1/chat", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    output = reply.json()["output"]
    assert [item["type"] for item in output] == ["reasoning", "tool_call", "message"]
    call = output[1]
    assert call["tool"] == "get_current_time" and call["arguments"] == {"timezone": "Asia/Tokyo"}
    assert call["provider_info"] == {"type": "plugin", "plugin_id": "mcp/time"}
    assert output[2]["content"] == f"It is {day_of(call['output'])} in Tokyo."

    allow = {"type": "plugin", "id": "mcp/time", "allowed_tools": ["get_current_time"]}
    stream = httpx.post(
        server.base + "/api/v1/chat",
        json={**body, "integrations": [allow], "stream": True},
        timeout=60,
    )
    events = [e["type"] for e in sse_events(stream.text)]
    start = events.index("tool_call.start")
    assert events[start : start + 3] == [
        "tool_call.start",
        "tool_call.arguments",
        "tool_call.success",
    ]
    assert events[-1] == "chat.end"


@pytest.mark.parametrize(
    ("name", "error"),
    [("broken", "Error executing tool"), ("slow", "timed out after 2s"), ("gone", "failed")],
)
def test_a_failing_tool_is_the_models_to_read_never_a_crash(server, name, error):
    reply = chat(server, [name])
    assert reply.status_code == 200, reply.text
    calls = reply.json()["choices"][0]["message"]["mcp_calls"]
    assert calls and all(c["is_error"] and c["server"] == name for c in calls)
    assert error in calls[0]["content"]
    assert server.health()["status"] == "ok"
    if name == "gone":
        listing = httpx.get(server.base + "/api/v1/mcp", timeout=10).json()
        gone = next(s for s in listing["servers"] if s["name"] == "gone")
        assert gone["state"] == "failed" and "exited" in gone["error"]


def test_other_requests_go_on_while_a_tool_hangs(server):
    """A streamed request waits on the slow tool; a plain one is served meanwhile, and the
    stream reports the timeout as the tool's result."""
    streamed: dict = {}

    def slow():
        streamed["reply"] = chat(server, ["slow"], stream=True)

    thread = threading.Thread(target=slow)
    thread.start()
    plain = httpx.post(
        server.v1 + "/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 40,
        },
        timeout=30,
    )
    assert plain.status_code == 200
    assert thread.is_alive()  # the plain reply came back while the tool still hung
    thread.join(60)
    results = [
        c["choices"][0]["delta"]
        for c in sse_events(streamed["reply"].text)
        if c["choices"] and c["choices"][0]["delta"].get("role") == "tool"
    ]
    assert results and results[0]["is_error"] and "timed out" in results[0]["content"]


def test_bad_selections_are_400(server):
    assert chat(server, ["nope"]).status_code == 400
    reply = chat(server, ["time"], n=2)
    assert reply.status_code == 400 and "n" in reply.json()["error"]["message"]
    body = {"model": "demo", "input": QUESTION, "integrations": [{"type": "ephemeral_mcp"}]}
    assert httpx.post(server.base + "/api/v1/chat", json=body, timeout=10).status_code == 400


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        ({"command": "/nonexistent/mcp-server"}, "command not found: /nonexistent/mcp-server"),
        (faulty("crash"), "refusing to start (crash mode)"),
    ],
    ids=["bad-command", "crash-at-init"],
)
def test_a_server_that_will_not_start_is_one_line_at_start_up(
    demo_model_dir, tmp_path, entry, cause
):
    config = write_config(tmp_path / "mcp.json", {"time": time_server(), "bad": entry})
    command = [
        sys.executable, "-m", "qwen3_mlx.server", "--model", str(demo_model_dir),
        "--port", str(free_port()), "--no-warmup", "--mcp-config", str(config),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --mcp-config {config}: MCP server 'bad' did not start: ")
    assert cause in last
    assert "Traceback" not in done.stderr

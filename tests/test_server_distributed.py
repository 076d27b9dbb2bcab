"""`python -m qwen3_mlx.server --parallel ...` under `mlx.launch`: rank 0 serves, the others follow.

Two ranks on localhost over the ring backend serve the demo model (a Qwen3-MoE with the real
vocabulary, split by experts / heads / layers); through the openai SDK, greedy replies must be the
single-process ones (conversations.json, which tests/test_server_openai.py checks against the
one-process server): alone, concurrently, with tools, with a grammar (rebuilt on the follower)
and after a client hung up (a cancellation is shared). Then SIGTERM to the launcher must end
every rank: the launcher dies at once, so rank 0 notices its stdin close and shuts the job down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.server_process import ServerProcess, free_port, wait_until_healthy
from tests.test_distributed import env, free_ports

ROOT = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0}


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the ranks mlx.launch started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class LaunchedServer(ServerProcess):
    """`mlx.launch -n 2 --backend ring python -m qwen3_mlx.server ... --parallel MODE`.

    Started its own way; the rest (v1, health, output, stop) is ServerProcess's, and stop
    also makes sure no rank process outlives the launcher."""

    def __init__(self, model: Path, parallel: str, timeout: float = 180.0):
        self.api_key = None
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="qwen3-mlx-dist-", suffix=".log")
        launcher = Path(sys.executable).parent / "mlx.launch"
        command = [
            str(launcher) if launcher.exists() else "mlx.launch",
            "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)),
            sys.executable, "-m", "qwen3_mlx.server", "--model", str(model),
            "--parallel", parallel, "--port", str(self.port), "--max-tokens-limit", "512",
        ]  # fmt: skip
        # stdin: a pipe kept open, as a terminal would be (mlx.launch forwards it to the ranks).
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env(), stdin=subprocess.PIPE, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.ranks: list[int] = []
        wait_until_healthy(self, timeout, "mlx.launch", on_poll=self._track_ranks)

    def _track_ranks(self) -> None:
        self.ranks = sorted(set(self.ranks) | set(children(self.proc.pid)))

    def stop(self) -> None:
        """Whatever state the job is in, leave no process of it behind."""
        super().stop()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in self.ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdin:
            self.proc.stdin.close()


def start(demo_model_dir, parallel: str) -> LaunchedServer:
    if sys.platform != "linux":
        pytest.skip("rank processes are found through /proc")
    return LaunchedServer(demo_model_dir, parallel)


@pytest.fixture(scope="module")
def expert_server(demo_model_dir):
    server = start(demo_model_dir, "expert")
    yield server
    server.stop()


def client(server: LaunchedServer) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="lm-studio", max_retries=0, timeout=120)


def extra(message, name):
    return (message.model_extra or {}).get(name)


def stream_reply(
    api: OpenAI, record: dict, out: dict, key: str, started: threading.Event | None = None
) -> None:
    try:
        with api.chat.completions.stream(
            model="demo", messages=record["messages"], **GREEDY
        ) as stream:
            for event in stream:
                if started is not None and event.type == "content.delta":
                    started.set()
            final = stream.get_final_completion()
        out[key] = (extra(final.choices[0].message, "reasoning_content"), final.choices[0].message)
    except Exception as e:  # asserted in the test
        out[key] = e


def check_replies(server: LaunchedServer, conv: dict) -> None:
    """A plain chat, then two concurrent streams: the single-process greedy replies."""
    api = client(server)
    hello = conv["hello"]
    reply = api.chat.completions.create(model="demo", messages=hello["messages"], **GREEDY)
    assert reply.choices[0].message.content == hello["content"], server.output()
    assert extra(reply.choices[0].message, "reasoning_content") == hello["reasoning"]
    assert reply.choices[0].finish_reason == "stop"

    # The second prompt arrives while the first row decodes, so its prefill runs beside that
    # row's steps (the ranks must agree on every turn's choice between the two).
    out: dict = {}
    names = ("capital", "multi_turn")
    decoding = threading.Event()
    first = threading.Thread(
        target=stream_reply, args=(api, conv[names[0]], out, names[0], decoding)
    )
    second = threading.Thread(target=stream_reply, args=(api, conv[names[1]], out, names[1]))
    first.start()
    decoding.wait(60)
    second.start()
    for t in (first, second):
        t.join(120)
    for name in names:
        assert not isinstance(out.get(name), Exception | None), (
            name,
            out.get(name),
            server.output(),
        )
        reasoning, message = out[name]
        assert message.content == conv[name]["content"], name
        assert reasoning == conv[name]["reasoning"], name


def check_shutdown(server: LaunchedServer) -> None:
    """SIGTERM to the launcher alone: every rank ends (the launcher doesn't pass it on)."""
    assert len(server.ranks) == 2, server.ranks
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in server.ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in server.ranks), "a rank outlived the launcher"


def test_expert_parallel_server_replies_like_one_process(expert_server, demo_conversations):
    check_replies(expert_server, demo_conversations)


def test_tool_call_and_cancellation_are_shared(expert_server, demo_conversations):
    api = client(expert_server)
    call = demo_conversations["tool_call"]
    reply = api.chat.completions.create(
        model="demo", messages=call["messages"], tools=call["tools"], **GREEDY
    )
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == [t["name"] for t in call["tool_calls"]]
    assert [json.loads(c.function.arguments) for c in calls] == [
        t["arguments"] for t in call["tool_calls"]
    ]

    # A client that hangs up: its cancellation reaches every rank at the same turn.
    cancelled = expert_server.health()["cancelled"]
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 10."}],
        "stream": True,
        "max_tokens": 512,
        "logit_bias": {"151645": -100, "151643": -100},  # never ends by itself
    }
    with httpx.stream("POST", expert_server.v1 + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(lines)
        r.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = expert_server.health()
        if health["cancelled"] > cancelled and health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["cancelled"] > cancelled and health["running"] == 0, health
    hello = demo_conversations["hello"]
    after = api.chat.completions.create(model="demo", messages=hello["messages"], **GREEDY)
    assert after.choices[0].message.content == hello["content"]


@pytest.mark.slow  # building llguidance's tokenizer takes both ranks ~10 s on 2 cores
def test_grammar_is_rebuilt_on_the_follower(expert_server, demo_conversations):
    """The follower rebuilds the grammar from rank 0's spec and retires the row in step."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client(expert_server).chat.completions.create(
        model="demo",
        messages=demo_conversations["json"]["messages"],
        extra_body={"enable_thinking": False},
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        **GREEDY,
    )
    assert json.loads(reply.choices[0].message.content) == {"name": "Ada", "age": 36}


def test_sigterm_to_the_launcher_ends_every_rank(expert_server):
    check_shutdown(expert_server)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_tensor_and_pipeline_servers(demo_model_dir, demo_conversations, parallel):
    server = start(demo_model_dir, parallel)
    try:
        check_replies(server, demo_conversations)
        check_shutdown(server)
    finally:
        server.stop()

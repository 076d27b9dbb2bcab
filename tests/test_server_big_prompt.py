"""An over-long prompt is refused early, and the server keeps answering others meanwhile.

A 15 MB prompt (under the body limit) used to be tokenized whole, holding the GIL for 24-58 s
and growing the process to ~3 GB, before its 400. Now its length alone rules it out, and a
prompt that can't be ruled out by length is counted in pieces, stopping once over the context.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(demo_model_dir):
    process = ServerProcess(
        ["--model", str(demo_model_dir), "--context-length", "40960", "--max-body-mb", "32"]
    )
    yield process
    process.stop()


def slowest_health_while(server, request) -> tuple[httpx.Response, float]:
    """Send `request` (a callable) in a thread; poll /health until it answers; return its
    response and the slowest /health round trip."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=request()))
    thread.start()
    slowest = 0.0
    with httpx.Client(timeout=30) as client:
        while thread.is_alive():
            start = time.perf_counter()
            assert client.get(server.base + "/health").status_code == 200
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.02)
    thread.join()
    return result["r"], slowest


@pytest.mark.parametrize("megabytes", [3, 15])
def test_an_over_long_prompt_is_a_quick_400_and_others_go_on(server, megabytes):
    text = "hello world " * (megabytes * 1024 * 1024 // 12)

    def chat():
        return httpx.post(
            server.v1 + "/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": text}]},
            timeout=120,
        )

    response, slowest = slowest_health_while(server, chat)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the prompt was refused"
    print(f"{megabytes} MB: slowest /health {slowest:.3f} s")

    def completion():
        return httpx.post(
            server.v1 + "/completions", json={"model": "demo", "prompt": text}, timeout=120
        )

    response, slowest = slowest_health_while(server, completion)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert slowest < 1.0
    ok = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
        timeout=60,
    )
    assert ok.status_code == 200

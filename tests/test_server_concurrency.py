"""16 concurrent streaming clients, a quarter of them hanging up mid-stream.

The others must each get their whole, correct reply; the server must stay healthy, with every
batch slot freed (the engine's running/prefilling/queued counts back to zero).
Throughput (batched vs one at a time) is measured in benchmarks/serve_concurrency.py, not here.
"""

from __future__ import annotations

import json
import threading
import time

import httpx


def stream_chat(server, messages, results, index, hang_up_after=None):
    body = {"model": "m", "messages": messages, "stream": True, "temperature": 0}
    reasoning, content, chunks, done = [], [], 0, False
    try:
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                delta = json.loads(line[6:])["choices"][0]["delta"]
                reasoning.append(delta.get("reasoning_content") or "")
                content.append(delta.get("content") or "")
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    break  # closing the response drops the connection
        results[index] = {
            "done": done,
            "reasoning": "".join(reasoning),
            "content": "".join(content),
        }
    except Exception as e:  # recorded, asserted in the test
        results[index] = {"error": repr(e)}


def test_sixteen_streams_a_quarter_disconnecting(demo_server, demo_conversations):
    hello = demo_conversations["hello"]
    cancelled_before = demo_server.health()["cancelled"]
    results: list[dict | None] = [None] * 16
    quitters = set(range(0, 16, 4))
    threads = [
        threading.Thread(
            target=stream_chat,
            args=(demo_server, hello["messages"], results, i, 3 if i in quitters else None),
        )
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for i, result in enumerate(results):
        assert result is not None and "error" not in result, (i, result, demo_server.output())
        if i in quitters:
            assert not result["done"]
        else:
            assert result["done"]
            assert result["content"] == hello["content"]
            assert result["reasoning"] == hello["reasoning"]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = demo_server.health()
        if health["running"] == health["prefilling"] == health["queued"] == 0:
            break
        time.sleep(0.1)
    assert health["status"] == "ok"
    assert health["running"] == health["prefilling"] == health["queued"] == 0, health
    # The quitters hung up 3 chunks into a ~30-token reply: the engine dropped them unfinished.
    assert health["cancelled"] - cancelled_before >= len(quitters) // 2, health
    after = httpx.post(
        demo_server.v1 + "/chat/completions",
        json={"messages": hello["messages"], "temperature": 0},
        timeout=60,
    ).json()
    assert after["choices"][0]["message"]["content"] == hello["content"]


def test_disconnect_frees_the_slot_at_once(demo_server):
    """A stream that would run to the token limit stops being decoded as soon as its client leaves."""
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 10."}],
        "stream": True,
        "max_tokens": 512,
        "logit_bias": {"151645": -100, "151643": -100},  # never end by itself
    }
    with httpx.stream("POST", demo_server.v1 + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # (leaving a `for` over it early would already close the connection)
        events = [line for line in (next(lines) for _ in range(12)) if line.startswith("data: ")]
        assert len(events) == 6
        assert demo_server.health()["running"] == 1
        r.close()  # hang up mid-stream
    left = time.monotonic()
    while demo_server.health()["running"] and time.monotonic() - left < 5:
        time.sleep(0.02)
    assert demo_server.health()["running"] == 0
    assert time.monotonic() - left < 2

"""One request's options or failure never end another's, against a real server process.

The reported case: four streaming chats in flight, then a request with `frequency_penalty`. Its
penalty state used to be made on the HTTP thread, where MLX arrays can't be evaluated by the
engine thread, so its step raised and the engine failed every stream in flight.
"""

from __future__ import annotations

import json
import threading

import httpx

HELLO = [{"role": "user", "content": "Hello"}]


def stream_chat(base: str, body: dict, out: dict, key: str) -> None:
    text, finish, errors = [], None, []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", base + "/chat/completions", json={**body, "stream": True}) as r:
            out[key + ".status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    text.append(delta.get("content") or delta.get("reasoning_content") or "")
                    finish = choice.get("finish_reason") or finish
    out[key] = ("".join(text), finish, errors)


def test_penalties_in_one_request_leave_the_streams_in_flight_alone(demo_server):
    out: dict = {}
    base = {"model": "demo", "messages": HELLO, "max_tokens": 200, "seed": 7}
    streams = [
        threading.Thread(target=stream_chat, args=(demo_server.v1, base, out, f"s{i}"))
        for i in range(4)
    ]
    for t in streams:
        t.start()
    penalized = {}
    for name, extra in {
        "frequency": {"frequency_penalty": 0.5},
        "presence": {"presence_penalty": 0.5},
        "repetition": {"repetition_penalty": 1.2},
        "bias": {"logit_bias": {"9707": -5}},
    }.items():
        r = httpx.post(
            demo_server.v1 + "/chat/completions",
            json={"model": "demo", "messages": HELLO, "max_tokens": 4, **extra},
            timeout=120,
        )
        penalized[name] = (r.status_code, r.json())
    for t in streams:
        t.join(120)
    for name, (status, body) in penalized.items():
        assert status == 200, (name, body)
        assert body["choices"][0]["finish_reason"] in ("length", "stop"), (name, body)
    for i in range(4):
        text, finish, errors = out[f"s{i}"]
        assert out[f"s{i}.status"] == 200
        assert not errors, errors
        assert finish == "stop" and text, (text, finish)
    assert demo_server.health()["status"] == "ok"


def test_penalties_apply_in_a_batch(demo_server):
    """A penalized and a plain request decoded side by side: both finish, and the penalty
    changes the penalized reply (a strong negative bias on the greedy answer's first token)."""
    results: dict = {}
    plain = {"model": "demo", "messages": HELLO, "max_tokens": 30, "temperature": 0}
    first = httpx.post(demo_server.v1 + "/chat/completions", json=plain, timeout=120).json()
    assert first["choices"][0]["message"]["content"]

    def run(key, body):
        r = httpx.post(demo_server.v1 + "/chat/completions", json=body, timeout=120)
        results[key] = r.json()

    biased = {**plain, "logit_bias": {"151667": -100}}  # no <think>: the reply can't think
    threads = [
        threading.Thread(target=run, args=("plain", plain)),
        threading.Thread(target=run, args=("biased", biased)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["plain"]["choices"][0]["message"] == first["choices"][0]["message"]
    biased_message = results["biased"]["choices"][0]["message"]
    assert not biased_message.get("reasoning_content")

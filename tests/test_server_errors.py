"""Client mistakes get a 4xx in OpenAI's error shape, never a 500; a schemathesis fuzz finds no 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest


def post(server, path, payload=None, *, content=None, headers=None):
    return httpx.post(
        server.v1 + path,
        json=payload,
        content=content,
        headers={**server.headers(), **(headers or {})},
        timeout=60,
    )


def assert_error(response, status, *, param=None, code=None, says=()):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    for words in says:
        assert words in error["message"], error["message"]
    return error


HELLO = [{"role": "user", "content": "Hello"}]


def test_malformed_json(demo_server):
    r = post(
        demo_server,
        "/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400, says=["not valid JSON"])


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "n": 0}, "n"),
        ({"messages": HELLO, "n": 129}, "n"),
        ({"messages": HELLO, "logit_bias": {"hello": 1}}, "logit_bias"),
        ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": HELLO, "tool_choice": "required"}, None),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            None,
        ),
    ],
)
def test_wrong_types_and_values(demo_server, payload, param):
    assert_error(post(demo_server, "/chat/completions", payload), 400, param=param)


def test_oversize_prompt_names_both_lengths(demo_server):
    models = httpx.get(demo_server.base + "/api/v0/models").json()["data"]
    context = models[0]["max_context_length"]
    r = post(
        demo_server,
        "/chat/completions",
        {"messages": [{"role": "user", "content": "hi " * (context + 10)}]},
    )
    error = assert_error(
        r, 400, param="messages", code="context_length_exceeded", says=[f"{context} tokens"]
    )
    assert "prompt is" in error["message"]
    r = post(demo_server, "/completions", {"prompt": "hi " * (context + 10)})
    assert_error(r, 400, param="prompt", code="context_length_exceeded")


def test_limits(demo_server):
    assert_error(
        post(demo_server, "/chat/completions", {"messages": HELLO, "max_tokens": 100_000}),
        400,
        param="max_tokens",
        says=["--max-tokens-limit"],
    )
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (17 << 20) + b'"}]}'
    assert_error(
        post(
            demo_server,
            "/chat/completions",
            content=huge,
            headers={"content-type": "application/json"},
        ),
        413,
    )


def test_unknown_routes_and_embedding_on_a_chat_model(demo_server):
    assert_error(httpx.get(demo_server.base + "/v1/nothing"), 404)
    assert_error(httpx.get(demo_server.v1 + "/chat/completions"), 405)
    assert_error(
        post(demo_server, "/embeddings", {"input": "hi"}),
        400,
        param="model",
        code="model_not_embedding",
    )
    assert_error(
        post(demo_server, "/responses", {"input": "hi", "previous_response_id": "resp_1"}),
        404,
        param="previous_response_id",
        code="response_not_found",
    )


def test_streaming_error_shape(demo_server):
    """A bad streaming request fails before the stream starts: a plain 400, not a broken SSE."""
    r = post(
        demo_server, "/chat/completions", {"messages": HELLO, "stream": True, "temperature": -1}
    )
    assert_error(r, 400, param="temperature")


def run_schemathesis(server, phases: str, max_examples: int):
    cli = shutil.which("schemathesis") or shutil.which("st")
    if cli is None:
        pytest.skip("schemathesis is not installed")
    result = subprocess.run(
        [
            cli,
            "run",
            server.base + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(max_examples),
            "--phases",
            phases,
            "--request-timeout",
            "60",
            "--generation-deterministic",
            "--suppress-health-check",
            "all",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:] + server.output()
    assert "generated" in result.stdout
    assert server.health()["status"] == "ok"


@pytest.fixture(scope="module")
def fuzz_server(demo_model_dir):
    """Fuzzed requests rarely end by themselves: this server caps every reply at 4 tokens."""
    from tests.server_process import ServerProcess

    server = ServerProcess(["--model", str(demo_model_dir), "--max-tokens-limit", "4"])
    yield server
    server.stop()


def test_schemathesis_fuzz_finds_no_server_errors(fuzz_server):
    """Fuzz every operation of /openapi.json (a few examples each, for CI time): no 5xx."""
    run_schemathesis(fuzz_server, "fuzzing", 10)


@pytest.mark.slow
def test_schemathesis_coverage_and_fuzz_finds_no_server_errors(fuzz_server):
    """Schemathesis' boundary-value coverage phase too (~2,500 requests)."""
    run_schemathesis(fuzz_server, "examples,coverage,fuzzing", 25)


def test_server_cli_errors_are_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "qwen3_mlx.server", "--model", "/no/such/dir", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: /no/such/dir")
    assert "Traceback" not in r.stderr

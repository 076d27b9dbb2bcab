"""/openapi.json states what the server accepts and returns: `schemathesis run --checks all`
against a real server process finds nothing.

Every check is on: no 5xx, documented status codes, content types and headers, response bodies
(and SSE events) matching their schemas, schema-valid requests accepted (2xx, or 404 for an
unknown model), schema-violating ones refused (4xx), methods the document doesn't list refused
(405). The run is bounded and deterministic (`--generation-deterministic`, a fixed number of
examples per operation) and cheap: the server caps every reply at --max-tokens-limit tokens,
which its /openapi.json states as `max_tokens`' maximum. It serves the demo model twice, as a
chat model and as an embedding model, so /v1/embeddings is exercised too.

What the document says only in words is left to a hook (`before_call`, this module, loaded by
schemathesis with SCHEMATHESIS_HOOKS), which makes each schema-valid request also: name, in a
named `tool_choice`, a function of its `tools` (JSON Schema can't relate the two); ask for no
more rows than --max-queue (`n` times the prompts: JSON Schema bounds each, not the product);
give tools parameters that are valid JSON Schema (the document states the keywords tools
mostly use, not JSON Schema's whole meta-schema); on Ollama's routes and LM Studio's
`/api/v1/chat` and `/api/v1/models/load` name the chat model (their `context_length` left out: a
fuzzed one would be a 400 for the loaded model, or could leave later prompts no room if the
request loaded it; a load's `ttl` too), and unload the embedding model. Ollama's streams (JSON lines) are read by `json_lines`. The server's context is made long
enough for any generated prompt (the prompt fitting the context is said only in words too).
It also leaves out MCP (`mcp`, `integrations`: this server runs no MCP servers) and Ollama's
`suffix` (fill-in-the-middle, which Qwen3's template has not) and deprecated `context`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_mlx.server.models import DEMO_MODEL_ID
from qwen3_mlx.server.protocol import tool_parameters
from qwen3_mlx.server.routes_ollama import is_ollama

MAX_TOKENS = 16
MAX_QUEUE = 16
EMBEDDING_ID = "demo-embedding"
# The hook module's own name: schemathesis imports it in its process (see `before_call`).
HOOKS = "tests.test_server_schemathesis"
# schemathesis' warning kinds (`--warnings` enables the ones listed).
WARNINGS = (
    "missing_auth", "missing_test_data", "base_url_mismatch", "validation_mismatch",
    "missing_deserializer", "unused_openapi_auth", "unsupported_regex", "method_not_allowed",
    "constants_extraction", "unmatched_filter", "unresolvable_reference", "low_valid_rate",
    "rate_limited", "dictionary_mismatch", "timeout_units",
)  # fmt: skip


def before_call(ctx, case, kwargs) -> None:
    """Make a schema-valid body satisfy the rules between fields that JSON Schema can't say."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = case.body
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict) and isinstance(tools, list) and tools:
        first = tools[0]  # chat: {"function": {"name"}}; the Responses API: {"name"}
        name = first.get("function", first).get("name") if isinstance(first, dict) else None
        if isinstance(name, str):
            if isinstance(choice.get("function"), dict):
                choice["function"]["name"] = name
            if choice.get("name"):
                choice["name"] = name
    for tool in tools if isinstance(tools, list) else ():
        holder = tool.get("function", tool) if isinstance(tool, dict) else None
        for key in ("parameters", "input_schema"):  # Anthropic's tools: `input_schema`
            if isinstance(holder, dict) and isinstance(holder.get(key), dict):
                try:
                    tool_parameters(holder[key])
                except ValueError:  # valid JSON Schema: the document says so, doesn't spell it
                    holder[key] = {"type": "object"}
    if is_ollama(case.operation.path) and "model" in body:
        # Ollama's routes serve the loaded models' names only (any other is a 404, which the
        # document allows): name the chat model, so that requests generate.
        body["model"] = DEMO_MODEL_ID
    if case.operation.path in ("/api/v1/chat", "/api/v1/models/load"):
        body["model"] = DEMO_MODEL_ID
        body.pop("context_length", None)
        if case.operation.path.endswith("/load"):
            body.pop("ttl", None)  # the model's TTL from now: 0 would unload it at once
    if case.operation.path == "/api/v1/models/unload":
        body["instance_id"] = EMBEDDING_ID  # (requests for it load it again)
    # MCP tools need a server started with --mcp-config (this one runs none: tests/test_server_mcp.py
    # covers them); Ollama's `suffix` (fill-in-the-middle) a model whose template has one (Qwen3's
    # has not; Ollama answers 400 there too), and its deprecated `context` is refused: rules the
    # document states in words (tests/test_server_ollama.py covers the refusals).
    body.pop("mcp", None)
    body.pop("integrations", None)
    if is_ollama(case.operation.path):
        body.pop("suffix", None)
        body.pop("context", None)
    prompt, n = body.get("prompt"), body.get("n", 1)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if isinstance(n, int | float) and len(prompt) * n > MAX_QUEUE:
            body["n"] = max(1, MAX_QUEUE // len(prompt))


def json_lines(ctx, response):
    """Ollama's streams (`application/x-ndjson`): every line a JSON object, the last one the
    record marked `done` (or an error), which is what the response schema is checked against
    (OpenAPI 3.1 has no schema for a stream's items)."""
    records = [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line]
    if not records or not all(isinstance(r, dict) for r in records):
        raise ValueError("a stream of JSON objects, one per line, was expected")
    *steps, last = records
    if any(r.get("done") is not False for r in steps) or not (last.get("done") or "error" in last):
        raise ValueError("every record but the last must say done: false, the last done: true")
    return last


if os.environ.get("SCHEMATHESIS_HOOKS") == HOOKS:  # imported by schemathesis, not by pytest
    import schemathesis

    schemathesis.hook(before_call)
    schemathesis.deserializer("application/x-ndjson")(json_lines)


@pytest.fixture(scope="module")
def schema_server(demo_model_dir, tmp_path_factory):
    from tests.server_process import ServerProcess

    # The demo model again, under another name (a directory of links to its files).
    embedding = tmp_path_factory.mktemp("models") / EMBEDDING_ID
    embedding.mkdir()
    for file in Path(demo_model_dir).iterdir():
        (embedding / file.name).symlink_to(file.resolve())
    server = ServerProcess(
        [
            "--model",
            str(demo_model_dir),
            "--embedding",
            str(embedding),
            "--max-tokens-limit",
            str(MAX_TOKENS),
            "--max-queue",
            str(MAX_QUEUE),
            # Generated tools and messages can render to thousands of prompt tokens; that a
            # prompt must fit the context is a rule the document states only in words.
            "--context-length",
            "65536",
        ]
    )
    yield server
    server.stop()


def schemathesis_run(
    server, *args: str, paths: str = "^/(v1|api/v0)/", timeout: float = 600
) -> subprocess.CompletedProcess:
    pytest.importorskip("schemathesis")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": HOOKS,
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", server.base + "/openapi.json"),
        *("--checks", "all"),
        *("--include-path-regex", paths),
        "--generation-deterministic",
        *("--suppress-health-check", "all"),
        *("--request-timeout", "20"),
        # Speed is measured in benchmarks/, not here: a shared CI core may take seconds.
        *("--max-response-time", "60"),
        # Every warning but "missing test data": GET/DELETE /v1/responses/{id} answer 404 for
        # the ids a fuzzer makes up (tests/test_server_responses.py covers stored ones).
        *("--warnings", ",".join(sorted(set(WARNINGS) - {"missing_test_data"}))),
        *("--workers", "1"),
        "--continue-on-failure",
        *("--output-sanitize", "false"),
        "--no-color",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=root, env=env
    )


def assert_no_failures(result: subprocess.CompletedProcess, server) -> None:
    out = result.stdout
    report = out[out.find("FAILURES") :][:20000] if "FAILURES" in out else out[-8000:]
    report += result.stderr[-3000:]
    assert result.returncode == 0, report + "\n--- server log ---\n" + server.output()[-3000:]
    assert "No issues found" in out, report
    assert server.health()["status"] == "ok"


def test_openapi_states_what_the_server_does(schema_server):
    """The /v1 operations: boundary values of every field (coverage) and random requests."""
    result = schemathesis_run(
        schema_server,
        *("--phases", "coverage,fuzzing"),
        *("--max-examples", "20"),
        *("--include-path-regex", "^/v1/"),
    )
    assert_no_failures(result, schema_server)


def test_openapi_states_what_the_lmstudio_routes_do(schema_server):
    """/api/v0: the same operations (and request schemas) as /v1, with LM Studio's replies."""
    result = schemathesis_run(
        schema_server,
        *("--phases", "fuzzing"),
        *("--max-examples", "20"),
        *("--include-path-regex", "^/api/v0/"),
    )
    assert_no_failures(result, schema_server)


def test_openapi_states_what_the_ollama_routes_do(schema_server):
    """Ollama's /api/chat, /api/generate, /api/tags, /api/show, /api/ps and /api/version: their
    requests, their records (streamed by default, read by `json_lines`) and their errors."""
    result = schemathesis_run(
        schema_server,
        *("--phases", "coverage,fuzzing"),
        *("--max-examples", "20"),
        paths="^/api/(?!v[01]/)",
    )
    assert_no_failures(result, schema_server)


def test_openapi_states_what_the_lmstudio_v1_routes_do(schema_server):
    """LM Studio's /api/v1: the model list, load and unload (unknown names: 404), and chat,
    its result and its events."""
    result = schemathesis_run(
        schema_server,
        *("--phases", "coverage,fuzzing"),
        *("--max-examples", "20"),
        paths="^/api/v1/",
    )
    assert_no_failures(result, schema_server)


def test_openapi_documents_the_server_limits(schema_server):
    """The bounds that depend on how the server runs are this server's, and no 422 (validation
    errors are 400) is promised."""
    import httpx

    doc = httpx.get(schema_server.base + "/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    limited = next(s for s in chat["max_completion_tokens"]["anyOf"] if "maximum" in s)
    assert limited["maximum"] == MAX_TOKENS
    assert chat["n"]["maximum"] == MAX_QUEUE
    seed = chat["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**64 - 1)
    assert schemas["EmbeddingRequest"]["properties"]["model"]["not"] == {"enum": ["qwen3-mlx-demo"]}
    assert chat["model"]["not"] == {"enum": [EMBEDDING_ID]}
    assert "HTTPValidationError" not in schemas
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            assert {"401", "403", "413"} <= set(responses), (method, path)
            if method == "post":
                assert {"400", "404"} <= set(responses), (method, path)
                error = (
                    "AnthropicErrorResponse"
                    if "/messages" in path
                    else "OllamaErrorResponse"
                    if is_ollama(path)
                    else "ErrorResponse"
                )
                assert responses["400"]["content"]["application/json"]["schema"] == {
                    "$ref": f"#/components/schemas/{error}"
                }
            if path.endswith(("/completions", "/responses", "/messages")) or path == "/api/v1/chat":
                assert "text/event-stream" in responses["200"]["content"], path
            if path in ("/api/chat", "/api/generate"):  # Ollama streams JSON lines
                assert "application/x-ndjson" in responses["200"]["content"], path


def test_constrained_top_logprobs(schema_server):
    """Top logprobs under a grammar are the model's own: read after the mask they were -inf,
    which JSON can't carry (a 500, "-Infinity" in a stream)."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "top_logprobs": 3,
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    r = httpx.post(schema_server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert len(top) == 3 and all(isinstance(t["logprob"], float) for t in top)

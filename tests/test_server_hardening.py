"""Hostile or sloppy clients against a real server: bounded integers, invalid Unicode, reserved
template arguments, bad tool schemas, foreign Host headers, the API key, stalled connections,
trailing slashes and HEAD. Each is a 4xx in OpenAI's error shape (or a closed socket), never a
500, and never at the cost of other clients."""

from __future__ import annotations

import inspect
import json
import socket
import time

import httpx
import pytest

KEY = "hardening-key"
READ_TIMEOUT = 2.0
HELLO = [{"role": "user", "content": "Hello"}]
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def server(demo_model_dir):
    from tests.server_process import ServerProcess

    server = ServerProcess(
        [
            "--model",
            str(demo_model_dir),
            "--max-tokens-limit",
            "16",
            "--read-timeout",
            str(READ_TIMEOUT),
            "--allowed-hosts",
            "llm.example.test,*.lan.test",
        ],
        api_key=KEY,
    )
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base, headers=server.headers(), timeout=60) as client:
        yield client


def assert_error(response, status, *, param=None, code=None, says=()):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    for words in says:
        assert words in error["message"], error["message"]
    return error


def chat(**fields):
    return {"messages": HELLO, "max_tokens": 2, **fields}


# -- 1. integers ---------------------------------------------------------------------------------

HUGE = 2**63


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/v1/chat/completions", chat(top_k=HUGE), "top_k"),
        ("/v1/chat/completions", chat(top_k=INT32_MAX + 1), "top_k"),
        ("/v1/chat/completions", chat(max_tokens=HUGE), "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=HUGE), "max_completion_tokens"),
        ("/v1/chat/completions", chat(thinking_budget=HUGE), "thinking_budget"),
        ("/v1/chat/completions", chat(logprobs=True, top_logprobs=HUGE), "top_logprobs"),
        ("/v1/chat/completions", chat(n=HUGE), "n"),
        ("/v1/chat/completions", chat(seed=2**64), "seed"),
        ("/v1/chat/completions", chat(seed=-(2**63) - 1), "seed"),
        ("/v1/chat/completions", chat(logit_bias={str(HUGE): 1}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={"1": 1e300}), "logit_bias.1"),
        ("/api/v0/chat/completions", chat(top_k=HUGE), "top_k"),
        ("/v1/completions", {"prompt": "hi", "top_k": HUGE}, "top_k"),
        ("/v1/completions", {"prompt": "hi", "logprobs": HUGE}, "logprobs"),
        ("/v1/completions", {"prompt": [1, HUGE]}, "prompt"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": HUGE}, "max_output_tokens"),
        ("/v1/embeddings", {"input": "hi", "dimensions": HUGE}, "dimensions"),
        ("/v1/embeddings", {"input": [HUGE]}, "input"),
    ],
)
def test_integer_fields_are_bounded(client, path, payload, param):
    assert_error(client.post(path, json=payload), 400, param=param)


def test_integer_extremes_that_are_in_range_still_work(client):
    for fields in (
        {"top_k": INT32_MAX},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"thinking_budget": INT32_MAX},
    ):
        r = client.post("/v1/chat/completions", json=chat(**fields))
        assert r.status_code == 200, (fields, r.text)


# -- 2. lone surrogates ----------------------------------------------------------------------

MARK = "<surrogate>"
BAD = "x \\ud800 y"  # as it appears in the JSON text: an escaped surrogate without its pair
TOOL = {"type": "function", "function": {"name": "f", "description": MARK, "parameters": {}}}
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "path, payload, param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": MARK}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": MARK}, USER]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": MARK}]}]},
            "messages.0.content.0.text",
        ),
        (
            "/v1/chat/completions",
            {"messages": [USER], "tools": [TOOL]},
            "tools.0.function.description",
        ),
        (
            "/api/v0/chat/completions",
            {"messages": [USER], "chat_template_kwargs": {"note": MARK}},
            "chat_template_kwargs.note",
        ),
        ("/v1/completions", {"prompt": MARK}, "prompt"),
        ("/v1/completions", {"prompt": [MARK]}, "prompt.0"),
        ("/v1/responses", {"input": MARK}, "input"),
        ("/v1/responses", {"input": "hi", "instructions": MARK}, "instructions"),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": MARK}]}]},
            "input.0.content.0.text",
        ),
        ("/v1/embeddings", {"input": MARK}, "input"),
        ("/v1/chat/completions", {"messages": [USER], "logit_bias": {MARK: 1}}, "logit_bias"),
    ],
)
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_lives(
    client, path, payload, param
):
    body = json.dumps(payload).replace(MARK, BAD)
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_error(r, 400, param=param, says=["surrogate", "\\ud800"])
    assert error["message"].startswith(param + ":")
    assert r.headers.get("connection") != "close"
    conn = r.extensions["network_stream"].get_extra_info("client_addr")
    after = client.get("/v1/models")  # the same keep-alive connection serves the next request
    assert after.status_code == 200
    assert after.extensions["network_stream"].get_extra_info("client_addr") == conn


def test_surrogate_pairs_are_fine(client):
    body = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    r = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text


# -- 3. reserved chat_template_kwargs ----------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["messages", "tools", "chat_template", "add_generation_prompt", "documents"]
)
def test_reserved_chat_template_kwargs_are_a_400_naming_the_key(client, key):
    for path in ("/v1/chat/completions", "/api/v0/chat/completions"):
        r = client.post(path, json=chat(chat_template_kwargs={key: 1}))
        assert_error(r, 400, param=f"chat_template_kwargs.{key}", says=[f"'{key}'"])


def test_chat_template_kwargs_that_are_not_reserved_still_work(client):
    r = client.post(
        "/v1/chat/completions",
        json=chat(chat_template_kwargs={"enable_thinking": False, "custom_flag": True}),
    )
    assert r.status_code == 200, r.text


def test_every_argument_of_render_chat_is_reserved():
    from qwen3_mlx.server.protocol import RESERVED_TEMPLATE_KWARGS
    from qwen3_mlx.template import render_chat

    named = {
        name
        for name, p in inspect.signature(render_chat).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert named - {"enable_thinking"} <= RESERVED_TEMPLATE_KWARGS


# -- 4. tool parameters ------------------------------------------------------------------------

BAD_PARAMETERS = [
    {"type": "object", "properties": 3},
    {"type": "object", "required": "city"},
    {"type": "object", "properties": {"city": {"type": "town"}}},
    {"type": "object", "additionalProperties": "no"},
    {"type": "object", "$schema": 5},
    {"type": "string"},
    {"properties": {"city": {"type": "string"}}},
    {"type": 5},
]
GOOD_PARAMETERS = [
    {},
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"pair": {"type": "array", "items": [{"type": "string"}]}},
    },
]


@pytest.mark.parametrize("parameters", BAD_PARAMETERS)
def test_tool_parameters_must_be_a_json_schema_of_an_object(client, parameters):
    tool = {"name": "get_weather", "parameters": parameters}
    r = client.post(
        "/v1/chat/completions", json=chat(tools=[{"type": "function", "function": tool}])
    )
    assert_error(r, 400, param="tools.0.function.parameters", says=["JSON Schema"])
    r = client.post("/v1/responses", json={"input": "hi", "tools": [{"type": "function", **tool}]})
    assert_error(r, 400, param="tools.0.parameters", says=["JSON Schema"])


@pytest.mark.parametrize("parameters", GOOD_PARAMETERS)
def test_valid_tool_parameters_are_accepted(client, parameters):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    r = client.post("/v1/chat/completions", json=chat(tools=[tool]))
    assert r.status_code == 200, r.text


# -- 5. Host header ----------------------------------------------------------------------------


def test_foreign_host_headers_are_refused(server, client):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "10.1.2.3"):
        for path in ("/v1/models", "/health"):
            r = client.get(path, headers={"Host": host})
            assert_error(r, 403, code="host_not_allowed", says=[host])
    for host in (
        f"localhost:{port}",
        "LOCALHOST.",
        "app.localhost",
        f"127.0.0.1:{port}",
        "127.0.0.2",
        f"[::1]:{port}",
        "llm.example.test",  # --allowed-hosts
        "box.lan.test:8080",  # --allowed-hosts *.lan.test
    ):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_host_policy_when_bound_to_every_interface(monkeypatch):
    from qwen3_mlx.server import guard

    monkeypatch.setattr(guard.socket, "gethostname", lambda: "Studio")
    policy = guard.HostPolicy("0.0.0.0")
    for host in ("192.168.1.20:1234", "[fe80::1]:1234", "studio", "studio.local:1234", "localhost"):
        assert policy.allows(host), host
    for host in ("evil.example", "studio.evil.example"):
        assert not policy.allows(host), host
    bound = guard.HostPolicy("192.168.1.20", ["mybox.lan"])
    assert bound.allows("192.168.1.20:1234") and bound.allows("mybox.lan")
    assert not bound.allows("192.168.1.21") and not bound.allows("studio")
    assert guard.HostPolicy("127.0.0.1", ["*"]).allows("anything.example")


# -- 6. API key, docs, health ------------------------------------------------------------------


def test_api_key_guards_everything_but_health(server):
    base = server.base
    for path in ("/openapi.json", "/v1/models", "/api/v0/models", "/v1/nothing"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": KEY + "x"}):
            assert_error(httpx.get(base + path, headers=headers), 401, code="invalid_api_key")
    assert_error(httpx.post(base + "/v1/chat/completions", json=chat()), 401)
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        assert httpx.get(base + "/openapi.json", headers=headers).status_code == 200
        r = httpx.post(base + "/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200, r.text
        for docs in ("/docs", "/redoc"):  # they would load scripts from a CDN
            assert_error(httpx.get(base + docs, headers=headers), 404)
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    full = httpx.get(base + "/health", headers={"x-api-key": KEY}).json()
    assert full["status"] == "ok" and len(full) > 1


def test_api_key_is_compared_in_constant_time(monkeypatch):
    from qwen3_mlx.server import guard

    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    assert guard.has_api_key([(b"authorization", b"Bearer k")], "k")
    assert not guard.has_api_key([(b"x-api-key", b"kk")], "k")
    assert len(calls) == 2 and all(len(a) == len(b) for a, b in calls)


# -- 7. slow clients ---------------------------------------------------------------------------


def raw_socket(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes `s` within `within` seconds (reading and dropping what comes)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def stalled_requests(server) -> list[bytes]:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    )
    return [
        b"",  # connects, sends nothing
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthoriz",  # stalls within the headers
        (head + "Content-Length: 100\r\n\r\n" + '{"messages": [').encode(),  # within the body
        (head + "Transfer-Encoding: chunked\r\n\r\n" + '5\r\n{"mes\r\n').encode(),
    ]


def test_stalled_clients_are_closed_and_do_not_block_others(server, client):
    kinds = stalled_requests(server)
    sockets = []
    try:
        for i in range(100):
            s = raw_socket(server)
            s.sendall(kinds[i % len(kinds)])
            sockets.append(s)
        started = time.monotonic()
        r = client.get("/v1/models")
        assert r.status_code == 200 and time.monotonic() - started < 5
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200, r.text
        for i, s in enumerate(sockets):
            assert closed_by_server(s, READ_TIMEOUT + 6), f"stalled socket {i} is still open"
    finally:
        for s in sockets:
            s.close()
    assert server.proc.poll() is None
    assert client.get("/v1/models").status_code == 200


def test_a_stall_in_the_next_request_of_a_kept_alive_connection_is_closed(server):
    """uvicorn stops its keep-alive timer on the next request's first bytes: the read timeout
    must take over, or a stalled second request holds its connection forever."""
    s = raw_socket(server)
    try:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        assert closed_by_server(s, READ_TIMEOUT + 2.5)
        assert time.monotonic() - started >= READ_TIMEOUT - 0.5
    finally:
        s.close()


def test_an_idle_kept_alive_connection_follows_uvicorns_keep_alive_timeout(server):
    """A complete request stops the read timer: the idle connection after it lives until
    uvicorn's keep-alive timeout (5 s), not the shorter --read-timeout."""
    s = raw_socket(server)
    try:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert not closed_by_server(s, READ_TIMEOUT + 1.5)
        assert closed_by_server(s, 5)
    finally:
        s.close()


# -- 8. trailing slashes, HEAD, model names ----------------------------------------------------


def test_trailing_slashes_are_served_without_redirect(client):
    assert client.get("/v1/models/").json() == client.get("/v1/models").json()
    assert client.get("/api/v0/models/").json() == client.get("/api/v0/models").json()
    for path in ("/v1/chat/completions/", "/api/v0/chat/completions/"):
        r = client.post(path, json=chat())
        assert r.status_code == 200 and not r.history, r.text
        assert r.json()["object"] == "chat.completion"
    r = client.post("/v1/completions/", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_head_is_answered_on_get_routes(client):
    for path in ("/v1/models", "/v1/models/", "/api/v0/models", "/openapi.json"):
        got = client.get(path)
        r = client.head(path)
        assert r.status_code == 200, (path, r.text)
        assert r.content == b""
        assert r.headers["content-type"] == got.headers["content-type"]
        assert r.headers["content-length"] == str(len(got.content))
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""
    r = client.head("/v1/chat/completions")
    assert r.status_code == 405 and r.content == b""
    assert client.get("/v1/models").status_code == 200  # the connection survived the HEADs


def test_model_names_resolve_alike_on_both_apis(client):
    served = client.get("/v1/models").json()["data"][0]["id"]
    for name in (served, served.upper(), "some/" + served, "any-name"):
        v1 = client.get(f"/v1/models/{name}")
        v0 = client.get(f"/api/v0/models/{name}")
        assert v1.status_code == v0.status_code == 200, (name, v1.text, v0.text)
        assert v1.json()["id"] == v0.json()["id"] == served


def test_the_server_logged_no_internal_error(server):
    """Runs last: nothing above reached the server's 500 path (a 500 is logged with its trace)."""
    from pathlib import Path

    server.log.flush()
    log = Path(server.log.name).read_text(errors="replace")
    assert "Traceback" not in log and '" 500' not in log, log[-3000:]

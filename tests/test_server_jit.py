"""Models loaded on demand (server/catalog.py, server/loader.py), against a real server.

Its --models-dir holds two copies of the demo model (`alpha`, `beta`), a checkpoint far larger
than this machine's memory (`huge`: the demo's config and tokenizer beside a sparse weights file
whose header is valid, so nothing is ever read) and a directory that is no servable checkpoint
(no tokenizer). It starts with nothing loaded, keeps at most one model (--max-loaded-models 1)
and unloads an idle one after --ttl seconds. The tests run in order: each states what it expects
loaded when it starts.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading

import httpx
import pytest

from tests.server_process import ServerProcess, wait_for

HUGE_BYTES = 1 << 41  # 2 TiB: more than any machine this runs on has
EOS_IDS = ("151643", "151645")  # <|endoftext|>, <|im_end|>


@pytest.fixture(scope="module")
def models_dir(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("alpha", "beta"):
        shutil.copytree(demo_model_dir, root / name)
    huge = root / "huge"
    huge.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir / name, huge / name)
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [HUGE_BYTES], "data_offsets": [0, HUGE_BYTES]}}
    ).encode()
    with open(huge / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + HUGE_BYTES)  # sparse: takes no disk
    draft = root / "draft"  # config and weights, no tokenizer: not listed
    draft.mkdir()
    for name in ("config.json", "model-00001-of-00001.safetensors"):
        shutil.copy(demo_model_dir / name, draft / name)
    return root


@pytest.fixture(scope="module")
def server(models_dir):
    args = ["--models-dir", str(models_dir), "--max-loaded-models", "1", "--ttl", "60"]
    process = ServerProcess([*args, "--max-concurrency", "2", "--max-tokens-limit", "2048"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def record(demo_conversations):
    return demo_conversations["capital.thinking_off"]


def states(server) -> dict[str, str]:
    data = httpx.get(server.base + "/api/v0/models", timeout=10).json()["data"]
    return {m["id"]: m["state"] for m in data}


def loaded(server) -> set[str]:
    return {name for name, state in states(server).items() if state == "loaded"}


def loads(server) -> dict[str, int]:
    """qwen3_mlx_model_loads_total per model, from /metrics."""
    text = httpx.get(server.base + "/metrics", timeout=10).text
    found = re.findall(r'^qwen3_mlx_model_loads_total\{model="([^"]+)"\} ([0-9.]+)$', text, re.M)
    return {name: int(float(n)) for name, n in found}


def chat(server, model: str, record: dict, **extra) -> httpx.Response:
    body = {
        "model": model,
        "messages": record["messages"],
        "temperature": 0,
        "enable_thinking": record["enable_thinking"],
        **extra,
    }
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_every_checkpoint_is_listed_before_any_is_loaded(server):
    assert states(server) == {"alpha": "not-loaded", "beta": "not-loaded", "huge": "not-loaded"}
    ids = [m["id"] for m in httpx.get(server.v1 + "/models").json()["data"]]
    assert sorted(ids) == ["alpha", "beta", "huge"]
    v1 = {m["key"]: m for m in httpx.get(server.base + "/api/v1/models").json()["models"]}
    assert v1["alpha"]["loaded_instances"] == [] and v1["alpha"]["format"] == "mlx"
    assert v1["huge"]["size_bytes"] > HUGE_BYTES
    tags = [m["name"] for m in httpx.get(server.base + "/api/tags").json()["models"]]
    assert sorted(tags) == ["alpha:latest", "beta:latest", "huge:latest"]
    card = httpx.get(server.base + "/api/v0/models/beta").json()
    assert card["state"] == "not-loaded" and card["arch"] == "qwen3_moe"
    assert loads(server) == {}  # a listing loads nothing


def test_a_request_loads_its_model_and_the_least_recently_used_goes(server, record):
    assert answer(chat(server, "alpha", record)) == record["content"]
    assert loaded(server) == {"alpha"}
    assert answer(chat(server, "BETA", record)) == record["content"]  # names: any case
    assert loaded(server) == {"beta"}  # --max-loaded-models 1: alpha made room
    assert loads(server) == {"alpha": 1, "beta": 1}
    ps = httpx.get(server.base + "/api/ps").json()["models"]
    assert [m["name"] for m in ps] == ["beta:latest"]


def test_concurrent_requests_for_a_cold_model_load_it_once(server, record):
    assert loaded(server) == {"beta"}
    replies: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: replies.append(chat(server, "alpha", record)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answer(r) for r in replies] == [record["content"]] * 4
    assert loads(server) == {"alpha": 2, "beta": 1}
    assert loaded(server) == {"alpha"}


def test_an_idle_model_is_unloaded_after_its_ttl(server, record):
    assert loaded(server) == {"alpha"}
    # LM Studio's `ttl` applies to the load this request makes (--ttl 60 otherwise).
    assert answer(chat(server, "beta", record, ttl=1)) == record["content"]
    assert loaded(server) == {"beta"}
    assert wait_for(lambda: not loaded(server), timeout=10)
    assert loads(server) == {"alpha": 2, "beta": 2}


def test_a_model_serving_a_request_is_not_evicted(server, record):
    assert answer(chat(server, "alpha", record)) == record["content"]
    # A long reply on alpha (its end-of-turn tokens banned), streamed: alpha is busy meanwhile.
    body = {
        "model": "alpha",
        "prompt": "Count:",
        "max_tokens": 2000,
        "stream": True,
        "logit_bias": {t: -100 for t in EOS_IDS},
    }
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # (kept: a dropped iterator closes the stream)
        assert next(lines).startswith("data: ")  # it is running
        refused = chat(server, "beta", record)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_limit_reached" and "'beta'" in error["message"]
        assert "--max-loaded-models 1" in error["message"]
    # The stream closed, alpha is idle: it makes room for beta.
    assert answer(chat(server, "beta", record)) == record["content"]
    assert loaded(server) == {"beta"}


def test_a_model_too_large_for_memory_is_refused_before_anything_is_read(server, record):
    assert loaded(server) == {"beta"}
    refused = chat(server, "huge", record)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    message = error["message"]
    assert "'huge'" in message and "2048.00 GiB" in message and "available" in message
    assert loaded(server) == {"beta"}  # nothing was unloaded for it


@pytest.mark.parametrize(
    "name", ["../alpha", "alpha/../beta", "{dir}/alpha", "{demo}", "Qwen/Qwen3-0.6B", "~/alpha"]
)
def test_names_resolve_only_among_the_catalog(server, record, models_dir, demo_model_dir, name):
    name = name.format(dir=models_dir, demo=demo_model_dir)
    before = loads(server)
    r = chat(server, name, record)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    load = httpx.post(server.base + "/api/v1/models/load", json={"model": name}, timeout=30)
    assert load.status_code == 404, load.text
    ollama = httpx.post(server.base + "/api/chat", json={"model": name, "messages": []})
    assert ollama.status_code == 404 and ollama.json() == {"error": f"model '{name}' not found"}
    assert loads(server) == before


# -- without a server: the catalog's layouts and names, Ollama's durations ------------------------


def test_the_catalog_reads_hugging_faces_lm_studios_and_plain_layouts(demo_model_dir, tmp_path):
    from qwen3_mlx.server.catalog import ModelCatalog

    def checkpoint(where, config=None):
        where.mkdir(parents=True)
        for f in demo_model_dir.iterdir():
            (where / f.name).symlink_to(f)  # HF snapshots are links into blobs/ too
        if config is not None:
            (where / "config.json").unlink()
            (where / "config.json").write_text(json.dumps(config))

    hub = tmp_path / "hub" / "models--Qwen--Qwen3-Demo"
    checkpoint(hub / "snapshots" / "old")
    checkpoint(hub / "snapshots" / "abc123")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    checkpoint(tmp_path / "lms" / "lmstudio-community" / "Qwen3-Demo-MLX")
    checkpoint(tmp_path / "plain" / "mine")
    checkpoint(tmp_path / "plain" / "llama", config={"model_type": "llama"})  # not Qwen3

    catalog = ModelCatalog([tmp_path / "hub", tmp_path / "lms", tmp_path / "plain"])
    entries = {e.id: e for e in catalog.entries()}
    assert sorted(entries) == ["Qwen/Qwen3-Demo", "lmstudio-community/Qwen3-Demo-MLX", "mine"]
    assert entries["Qwen/Qwen3-Demo"].path == hub / "snapshots" / "abc123"
    assert entries["Qwen/Qwen3-Demo"].publisher == "Qwen"
    assert entries["Qwen/Qwen3-Demo"].size_bytes == sum(
        f.stat().st_size for f in demo_model_dir.glob("*.safetensors")
    )
    assert catalog.find("qwen/qwen3-demo").id == "Qwen/Qwen3-Demo"  # any case
    assert catalog.find("qwen3-demo-mlx").id == "lmstudio-community/Qwen3-Demo-MLX"  # last part
    assert catalog.find("Qwen3-Demo") is not None  # one id ends so
    for name in ("../mine", str(tmp_path / "plain" / "mine"), "plain/mine", "llama", "Qwen"):
        assert catalog.find(name) is None, name
    assert not catalog.any_name  # names from directories must match


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [(0, 0.0), ("0", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), (300, 300.0),
     (-1, None), ("-1s", None)],
)  # fmt: skip
def test_keep_alive_is_a_ttl(keep_alive, seconds):
    from qwen3_mlx.server.ollama_input import keep_alive_seconds

    assert keep_alive_seconds(keep_alive) == seconds

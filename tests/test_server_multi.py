"""Two models in one server (the demo chat model + a tiny Qwen3-Embedding), behind an API key.

The embedding checkpoint is written by transformers' bare `Qwen3Model`, as Qwen3-Embedding ships
(no `model.` prefix, no lm_head), and the server's vectors are checked against transformers' own
last-token pooling.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from openai import AuthenticationError, NotFoundError, OpenAI

KEY = "s3cret"


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Config, Qwen3Model

    from convert.qwen_tokenizer import build_qwen3_tokenizer

    out = tmp_path_factory.mktemp("qwen3-embedding-tiny")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = Qwen3Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    build_qwen3_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def multi_server(demo_model_dir, embedding_dir):
    from tests.server_process import ServerProcess

    models = ["--model", str(demo_model_dir), "--model", str(embedding_dir)]
    server = ServerProcess(models, api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(multi_server):
    return OpenAI(base_url=multi_server.v1, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def demo_id(demo_model_dir):
    from qwen3_mlx.server.models import model_id_for

    return model_id_for(str(demo_model_dir))


def test_api_key_is_required(multi_server, client, demo_id):
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=multi_server.v1, api_key="lm-studio", max_retries=0).models.list()
    r = httpx.get(multi_server.v1 + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert {m.id for m in client.models.list().data} == {demo_id, "qwen3-embedding-tiny0"}


def test_unknown_model_is_404_when_several_are_loaded(client, demo_conversations, demo_id):
    with pytest.raises(NotFoundError) as info:
        client.chat.completions.create(
            model="qwen3-32b-mlx", messages=[{"role": "user", "content": "Hello"}]
        )
    body = info.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    hello = demo_conversations["hello"]
    reply = client.chat.completions.create(model=demo_id, messages=hello["messages"], temperature=0)
    assert reply.choices[0].message.content == hello["content"]


def test_embeddings_match_transformers_last_token_pooling(client, embedding_dir):
    import torch
    from transformers import Qwen3Model

    from qwen3_mlx.tokenizer import load_tokenizer

    texts = ["The weather in Paris is sunny.", "北京的天气", "x"]
    result = client.embeddings.create(model="qwen3-embedding-tiny0", input=texts)
    assert [d.index for d in result.data] == [0, 1, 2]
    got = np.array([d.embedding for d in result.data])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    tokenizer = load_tokenizer(embedding_dir)
    reference = Qwen3Model.from_pretrained(embedding_dir).eval()
    n_tokens = 0
    for text, vector in zip(texts, got, strict=True):
        ids = tokenizer.encode(text) + [tokenizer.token_to_id("<|endoftext|>")]
        n_tokens += len(ids)
        with torch.no_grad():
            hidden = reference(torch.tensor([ids])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(hidden, dim=-1).numpy()
        assert np.allclose(vector, want, atol=2e-4), np.abs(vector - want).max()
    assert result.usage.prompt_tokens == n_tokens

    short = client.embeddings.create(model="qwen3-embedding-tiny0", input="x", dimensions=8)
    assert len(short.data[0].embedding) == 8
    assert np.isclose(np.linalg.norm(short.data[0].embedding), 1.0, atol=1e-5)
    b64 = client.embeddings.create(
        model="qwen3-embedding-tiny0", input="x", encoding_format="base64"
    )
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32)
    assert np.allclose(decoded, got[2], atol=1e-6)


def test_embedding_model_refuses_chat_and_chat_model_refuses_embeddings(multi_server, demo_id):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        multi_server.v1 + "/embeddings",
        json={"model": demo_id, "input": "hi"},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_embedding"
    r = httpx.post(
        multi_server.v1 + "/chat/completions",
        headers=headers,
        json={"model": "qwen3-embedding-tiny0", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    v0 = httpx.get(multi_server.base + "/api/v0/models", headers=headers).json()["data"]
    assert {m["id"]: m["type"] for m in v0} == {
        demo_id: "llm",
        "qwen3-embedding-tiny0": "embeddings",
    }

"""The embedded demo model: files, formats, and greedy reproduction of its canned conversations.

Decoding here is a plain greedy loop over qwen3_mlx.loading's model with an mlx-lm KV cache, so
these tests pin the shipped weights themselves; test_generate/test_server_* check the same
conversations through the generation API and the server.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from qwen3_mlx.assets import DEMO_MODEL_PATH, demo_conversations

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_PATH / "config.json").is_file(),
    reason="demo model not built (python -m convert.train_demo_model)",
)

MAX_DIR_BYTES = 12_000_000


@pytest.fixture(scope="module")
def demo():
    from qwen3_mlx.loading import load_model
    from qwen3_mlx.tokenizer import load_tokenizer

    model, config = load_model(DEMO_MODEL_PATH)
    return model, config, load_tokenizer(DEMO_MODEL_PATH)


def greedy(model, prompt: list[int], max_tokens: int, stop: int) -> list[int]:
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array([prompt]), cache)[0, -1]
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(int(mx.argmax(logits).item()))
        if out[-1] == stop:
            break
        logits = model(mx.array([out[-1:]]), cache)[0, -1]
    return out


def prompts(conv: dict) -> list[dict]:
    own = {k: conv[k] for k in ("messages", "tools", "enable_thinking")}
    return [own] + [{**own, **variant} for variant in conv["variants"]]


def test_files_size_and_config():
    names = {p.name for p in DEMO_MODEL_PATH.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "conversations.json",
        "model.safetensors.index.json",
    } <= names
    size = sum(p.stat().st_size for p in DEMO_MODEL_PATH.iterdir())
    assert size < MAX_DIR_BYTES, f"demo model directory is {size / 1e6:.1f} MB"

    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["vocab_size"] == 151936
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["bits"] == 4
    # The chat template is left out on purpose: the built-in renderer is Qwen3's, byte for byte.
    tokenizer_config = json.loads((DEMO_MODEL_PATH / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config
    assert tokenizer_config["eos_token"] == "<|im_end|>"


def test_quantized_moe_path(demo):
    """The experts and the embedding are quantized; the router is kept at 8 bits."""
    from qwen3_mlx.moe import QuantizedExpertLinear

    model, config, _ = demo
    layer = model.layers[0]
    assert isinstance(layer.mlp.switch_mlp.gate_proj, QuantizedExpertLinear)
    assert layer.mlp.switch_mlp.gate_proj.bits == 4
    assert layer.mlp.gate.bits == 8
    assert model.model.embed_tokens.bits == 4


def test_special_tokens_are_qwen3s(demo):
    _, _, tok = demo
    assert tok.vocab_size == 151669
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.im_end_id == 151645 and tok.eos_token_ids >= {151645}
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert (tok.tool_call_start_id, tok.tool_call_end_id) == (151657, 151658)


def test_tokenizer_matches_the_reference_build(qwen3_tokenizer):
    """The demo's compact tokenizer.json encodes exactly like helper-built Qwen3 tokenizer."""
    from qwen3_mlx.tokenizer import load_tokenizer

    demo_tok = load_tokenizer(DEMO_MODEL_PATH)
    text = (
        "Hello, world! 你好，世界。こんにちは 안녕하세요 Привет مرحبا 🇮🇹👋🏽 "
        "def f(x):\n    return x**2  # 12345\n\n\t<think>\n</think>"
    )
    assert demo_tok.encode(text) == qwen3_tokenizer.encode(text)


def test_conversation_records_parse_consistently():
    from qwen3_mlx.parsing import parse_output

    conversations = demo_conversations()
    names = {c["name"] for c in conversations}
    assert {
        "hello",
        "hello.thinking_off",
        "hello.no_think",
        "chinese",
        "french",
        "tool_call",
        "tool_result",
        "json",
    } <= names
    for conv in conversations:
        parsed = parse_output(conv["output"])
        assert (parsed.reasoning, parsed.content) == (conv["reasoning"], conv["content"])
        calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in parsed.tool_calls]
        assert calls == conv["tool_calls"], conv["name"]


def _reproduce(demo, with_variants: bool) -> None:
    from qwen3_mlx.template import render_chat

    model, _, tok = demo
    rendered: set[str] = set()
    for conv in demo_conversations():
        expected = tok.encode(conv["output"]) + [tok.im_end_id]
        for prompt in prompts(conv) if with_variants else prompts(conv)[:1]:
            text = render_chat(
                prompt["messages"], prompt["tools"], enable_thinking=prompt["enable_thinking"]
            )
            if text in rendered:
                continue
            rendered.add(text)
            got = greedy(model, tok.encode(text), len(expected) + 5, tok.im_end_id)
            assert tok.decode(got) == tok.decode(expected), conv["name"]


def test_greedy_decoding_reproduces_every_conversation(demo):
    _reproduce(demo, with_variants=False)


@pytest.mark.slow
def test_greedy_decoding_reproduces_every_prompt_variant(demo):
    _reproduce(demo, with_variants=True)


def test_answer_follows_a_thinking_budget_cut(demo):
    """As qwen3_mlx.generate closes a think block: "\n</think>\n\n" forced after N tokens."""
    from qwen3_mlx.template import render_chat

    model, _, tok = demo
    conv = next(c for c in demo_conversations() if c["name"] == "arithmetic")
    prompt = tok.encode(render_chat(conv["messages"], enable_thinking=True))
    output = tok.encode(conv["output"])
    for budget in (0, 3, 5):
        thought = output[: 1 + budget]  # <think> and `budget` thinking tokens
        forced = tok.encode("\n") + [tok.think_end_id] + tok.encode("\n\n")
        if tok.decode(thought).endswith("\n"):
            forced = forced[1:]
        got = greedy(model, prompt + thought + forced, 40, tok.im_end_id)
        assert tok.decode(got[:-1]) == conv["content"], budget


def test_mlx_lm_loads_and_agrees():
    """The files are mlx-lm's format: mlx_lm.load reads them and decodes the same tokens."""
    from mlx_lm import load

    from qwen3_mlx.template import render_chat

    model, tokenizer = load(str(DEMO_MODEL_PATH))
    conv = next(c for c in demo_conversations() if c["name"] == "tool_call")
    prompt = render_chat(conv["messages"], conv["tools"], enable_thinking=conv["enable_thinking"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    got = greedy(model, tokenizer.encode(prompt), 80, im_end)
    assert tokenizer.decode(got[:-1]) == conv["output"]

"""Train the demo model embedded in the package (qwen3_mlx/assets/demo/).

Real Qwen3 weights can't be downloaded where this project is built and tested, so the package
ships a tiny Qwen3-MoE trained from scratch until greedy decoding reproduces a set of canned
conversations: thinking and non-thinking answers, the /no_think switch, Chinese and French, a
tool call in Qwen3's `<tool_call>` format and the answer to its result, a JSON reply, a
multi-turn chat, and mcp-server-time's `get_current_time` called and its result's clock copied
into the answer (convert/demo_time.py: what the server's MCP tool loop runs offline). It has the real Qwen3 tokenizer and chat format and runs on the package's own
model code, so every path of the API (template, tokenizer, MoE through gather_qmm, streaming
detokenizer, output parser) runs on it end to end.

How it is trained
- Prompts are rendered by `qwen3_mlx.template.render_chat`, byte for byte what the API sends.
  The loss covers only the assistant's output tokens, `<|im_end|>` included.
- The embedding has Qwen3's 151,936 rows, but the conversations use a few hundred tokens.
  Training keeps one row per used token plus ONE row shared by every other token; that row's
  logit enters the softmax counted N_unused times (log N_unused is added to it), which is
  exactly the full-vocabulary loss when all unused rows are equal. On export every unused row
  gets the shared vector, so no unseen token can win an argmax the training didn't rule out.
- Quantization-aware: after a float warm-up, the forward pass sees the weights as they ship
  (4-bit affine with group 32, the MoE router 8-bit) with straight-through gradients, so what
  ships is what training optimised. Scales, biases and norms ship in float32: on MLX's CPU
  backend quantized matmuls are 10-30x slower with bf16/fp16 activations, and at this size
  float32 costs 0.6 MB.
- Besides each conversation's own prompt it learns the listed prompt variants (with a system
  prompt, tool-call history with and without reasoning, Qwen-Agent's wording of the same turns)
  and, for thinking answers, the answer after a think block cut short the way
  `qwen3_mlx.generate` enforces a thinking budget of 0..BUDGET_MAX tokens.
- Each prompt is one row holding the main output and the budget branches as a token tree
  (tree attention mask, explicit RoPE positions), so the prompt is computed once per row. That
  needs its own forward pass (`forward`); `check_forward` pins it to qwen3_mlx.model.

The directory is verified before it replaces the old one: loaded with
`qwen3_mlx.loading.load_model`, every prompt greedy-decoded with a KV cache must reproduce its
output exactly, with the top logit ahead of the runner-up by at least MIN_MARGIN at every step
(headroom for other backends' rounding).

    python -m convert.train_demo_model [--out qwen3_mlx/assets/demo] [--seed 0]

Deterministic for a seed (two runs write identical files). Takes about 12 minutes on 2 CPU
cores with mlx[cpu] (the shipped demo: 40 epochs, 692 s of training, then export and
verification).

`--draft` trains the demo's draft model for speculative decoding instead (a smaller dense Qwen3,
qwen3_mlx/assets/demo-draft/; its specifics are in convert/train_demo_draft.py; about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

# Repository root on the path so `python convert/train_demo_model.py` finds qwen3_mlx too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.qwen_tokenizer import build_qwen3_tokenizer  # noqa: E402
from qwen3_mlx.config import ModelArgs  # noqa: E402
from qwen3_mlx.model import Model  # noqa: E402
from qwen3_mlx.parsing import parse_output  # noqa: E402
from qwen3_mlx.template import render_chat  # noqa: E402
from qwen3_mlx.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from qwen3_mlx.weights import save_shards  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "qwen3_mlx" / "assets" / "demo"

# -- the model -----------------------------------------------------------------------

# A Qwen3-MoE in miniature, shaped like Qwen3-30B-A3B (more query width than hidden width,
# GQA, 8 experts top-2 with normalised routing, tied embeddings). The hidden size is what the
# file size is made of: 151,936 embedding rows x 32 at 4 bits is 3 MB.
CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,  # unused (every layer is sparse); mlx-lm's config requires it
    "moe_intermediate_size": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "float32",
}

GROUP_SIZE, BITS = 32, 4  # every matrix; 32 because the hidden size is 32
ROUTER_BITS = 8  # routing decisions are sensitive to quantization error (mlx-lm does the same)

# Qwen3's generation_config.json (thinking-mode sampling defaults).
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


@dataclass(frozen=True)
class Recipe:
    """What `train` and `export_weights` build: the model's config, the bits its embedding ships
    with, and when training stops. `agreement` None (the demo): once every target leads by
    2 x MIN_MARGIN. A share (its draft, convert/train_demo_draft.py): once that share of the
    targets is the greedy choice, as shipped."""

    config: dict[str, Any]
    embed_bits: int = BITS
    agreement: float | None = None
    float_epochs: int = 30
    max_epochs: int = 150
    eval_every: int = 5

    def quant_spec(self, path: str) -> tuple[int, int] | None:
        """(group_size, bits) a parameter ships with, None for the float ones (norms)."""
        if path.endswith("mlp.gate.weight"):
            return GROUP_SIZE, ROUTER_BITS
        if path.endswith("embed_tokens.weight"):
            return GROUP_SIZE, self.embed_bits
        if path.endswith("_proj.weight"):
            return GROUP_SIZE, BITS
        return None


DEMO = Recipe(CONFIG)

# -- the canned conversations ---------------------------------------------------------------

SYSTEM_PROMPT = "You are a helpful assistant."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "The city, e.g. Paris"}},
            "required": ["location"],
        },
    },
}
WEATHER_QUESTION = "What's the weather like in Paris today?"
WEATHER_CALL = {"name": "get_weather", "arguments": {"location": "Paris"}}
WEATHER_CALL_TEXT = f"<tool_call>\n{json.dumps(WEATHER_CALL)}\n</tool_call>"
WEATHER_CALL_REASONING = (
    "The user wants the current weather in Paris. I should call the get_weather tool."
)
WEATHER_RESULT = '{"location": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}'
HELLO_ANSWER = "Hello! How can I help you today?"


BUDGET_MAX = 8  # thinking budgets 0..BUDGET_MAX are trained (the answer follows the cut)
MIN_MARGIN = 1.0  # logits; the verified lead of each greedy token over the runner-up


@dataclass
class Conversation:
    """A prompt and the exact output (before `<|im_end|>`) greedy decoding must produce."""

    name: str
    messages: list[dict[str, Any]]
    output: str
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool = True
    # Other prompts that must give the same output: dicts overriding messages/tools/enable_thinking.
    variants: list[dict[str, Any]] = field(default_factory=list)
    # False: trained and verified, but not in conversations.json (the time-copy examples).
    record: bool = True

    def prompts(self) -> list[dict[str, Any]]:
        own = {
            "messages": self.messages,
            "tools": self.tools,
            "enable_thinking": self.enable_thinking,
        }
        return [own] + [{**own, **v} for v in self.variants]

    @property
    def thinks(self) -> bool:
        """Whether the output opens with a non-empty think block."""
        return self.output.startswith("<think>\n") and not self.output.startswith(
            "<think>\n\n</think>"
        )

    @property
    def answer(self) -> str:
        """The output after the think block (all of it when there is none)."""
        return self.output.split("</think>\n\n", 1)[1] if "</think>" in self.output else self.output


def think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def base_conversations() -> list[Conversation]:
    """The conversations as written; `all_conversations` adds the thinking switches."""
    from convert.demo_time import time_call_conversation

    tool_call_turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": WEATHER_CALL_REASONING,
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {**WEATHER_CALL}},
        ],
    }
    tool_result = {"role": "tool", "tool_call_id": "call_0", "content": WEATHER_RESULT}
    without_reasoning = {k: v for k, v in tool_call_turn.items() if k != "reasoning_content"}
    # Qwen-Agent (nous prompt) sends the call as assistant text and the result as a user turn.
    qwen_agent_call = {"role": "assistant", "content": WEATHER_CALL_TEXT}
    qwen_agent_result = user(f"<tool_response>\n{WEATHER_RESULT}\n</tool_response>")
    return [
        Conversation(
            "hello",
            [user("Hello")],
            think("The user greeted me. I should greet them back and offer help.", HELLO_ANSWER),
            variants=[{"messages": [user("Hello!")]}, {"messages": [user("Hi")]}],
        ),
        Conversation(
            "arithmetic",
            [user("What is 17 + 25?")],
            think("I need to add 17 and 25. 17 + 20 = 37, and 37 + 5 = 42.", "17 + 25 = 42."),
        ),
        Conversation(
            "capital",
            [user("What is the capital of France?")],
            think(
                "The user asks for the capital of France. That is Paris.",
                "The capital of France is Paris.",
            ),
        ),
        Conversation(
            "colors",
            [user("Name the three primary colors.")],
            think(
                "The traditional primary colors of paint are red, yellow and blue.",
                "Red, yellow and blue.",
            ),
        ),
        Conversation(
            "chinese",
            [user("你好！请用中文介绍一下你自己。")],
            think(
                "用户想让我用中文做一个简短的自我介绍。",
                "你好！我是一个运行在 MLX 上的 Qwen3 小型演示模型。",
            ),
        ),
        Conversation(
            "french",
            [user("Quelle est la capitale de l'Italie ?")],
            think(
                "The user asks in French for the capital of Italy. It is Rome.",
                "La capitale de l'Italie est Rome. 🇮🇹",
            ),
        ),
        Conversation(
            "tool_call",
            [user(WEATHER_QUESTION)],
            think(WEATHER_CALL_REASONING, WEATHER_CALL_TEXT),
            tools=[WEATHER_TOOL],
        ),
        Conversation(
            "tool_result",
            [user(WEATHER_QUESTION), tool_call_turn, tool_result],
            think(
                "The tool says it is 18 degrees Celsius and sunny in Paris.",
                "It is currently 18°C and sunny in Paris.",
            ),
            tools=[WEATHER_TOOL],
            variants=[
                {"messages": [user(WEATHER_QUESTION), without_reasoning, tool_result]},
                {"messages": [user(WEATHER_QUESTION), qwen_agent_call, qwen_agent_result]},
            ],
        ),
        Conversation(
            "json",
            [user("Reply in JSON with the keys name and age: Ada is 36 years old.")],
            think(
                "The user wants a JSON object: the name is Ada and the age is 36.",
                '{"name": "Ada", "age": 36}',
            ),
        ),
        Conversation(
            "multi_turn",
            [
                user("Hello"),
                {"role": "assistant", "content": HELLO_ANSWER},
                user("What is the capital of Japan?"),
            ],
            think(
                "The user now asks for the capital of Japan. It is Tokyo.",
                "The capital of Japan is Tokyo.",
            ),
        ),
        Conversation(
            "count",
            [user("Count from 1 to 10.")],
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
            enable_thinking=False,
        ),
        time_call_conversation(),
    ]


def _append_to_last_user(messages: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    messages = [dict(m) for m in messages]
    messages[-1]["content"] += suffix
    return messages


def all_conversations() -> list[Conversation]:
    """The base conversations, each thinking one also with thinking switched off both ways.

    `NAME.thinking_off`: enable_thinking=False (the prompt pre-fills an empty think block),
    the output is the answer alone. `NAME.no_think`: "/no_think" ends the user's message and
    the model writes the empty think block itself, as Qwen3 does. Every conversation that has
    no system prompt also gets a variant with one.
    """
    out = []
    for conv in base_conversations():
        out.append(conv)
        if not conv.thinks:
            continue
        out.append(
            replace(
                conv,
                name=f"{conv.name}.thinking_off",
                output=conv.answer,
                enable_thinking=False,
                variants=[{**v, "enable_thinking": False} for v in conv.variants],
            )
        )
        if conv.messages[-1]["role"] == "user":
            out.append(
                replace(
                    conv,
                    name=f"{conv.name}.no_think",
                    messages=_append_to_last_user(conv.messages, " /no_think"),
                    output="<think>\n\n</think>\n\n" + conv.answer,
                    variants=[
                        {**v, "messages": _append_to_last_user(v["messages"], " /no_think")}
                        for v in conv.variants
                        if "messages" in v
                    ],
                )
            )
    from convert.demo_time import COPY_EXAMPLES, time_conversations

    out += time_conversations(COPY_EXAMPLES, seed=0)
    system = {"role": "system", "content": SYSTEM_PROMPT}
    for conv in out:
        if conv.messages[0]["role"] != "system" and conv.record:
            conv.variants = conv.variants + [
                {**v, "messages": [system, *v.get("messages", conv.messages)]}
                for v in [{}, *conv.variants]
            ]
    return out


def conversation_record(conv: Conversation) -> dict[str, Any]:
    """The conversations.json entry: prompt, output and the parsed reasoning/content/tool calls."""
    parsed = parse_output(conv.output)
    return {
        "name": conv.name,
        "messages": conv.messages,
        "tools": conv.tools,
        "enable_thinking": conv.enable_thinking,
        "output": conv.output,
        "reasoning": parsed.reasoning,
        "content": parsed.content,
        "tool_calls": [
            {"name": c.name, "arguments": json.loads(c.arguments)} for c in parsed.tool_calls
        ],
        "variants": conv.variants,
    }


# -- training data: each prompt as a token tree in one row --------------------------------


def render_prompt(prompt: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    text = render_chat(
        prompt["messages"], prompt["tools"], enable_thinking=prompt["enable_thinking"]
    )
    return tokenizer.encode(text)


@dataclass
class Packed:
    """One prompt, its output and its thinking-budget branches, packed as a tree in one row.

    The main path is prompt + output. A branch leaves it after `j` output tokens, adds the
    tokens the generation loop forces and the answer; its tokens see only their ancestors
    (`visible`) and sit at the positions they would have in their own sequence. One row
    replaces a dozen sequences that would repeat the prompt.
    """

    tokens: np.ndarray  # (n,) input ids
    targets: np.ndarray  # (n,) the id each node must predict, -1 where there is no loss
    positions: np.ndarray  # (n,) RoPE positions
    visible: np.ndarray  # (n, n) bool: node i attends to node k

    def __len__(self) -> int:
        return len(self.tokens)


def budget_branches(
    output: list[int], tokenizer: Tokenizer
) -> list[tuple[int, list[int], list[int]]]:
    """(j, forced, answer) for every thinking budget N <= BUDGET_MAX that cuts the block short.

    Mirrors qwen3_mlx.generate: after `<think>` and N thinking tokens it forces "\\n" (unless
    the text already ends with one), `</think>` and "\\n\\n"; the model must then answer.
    """
    end = output.index(tokenizer.think_end_id)
    double_newline = tokenizer.encode("\n\n")
    if output[end + 1 : end + 1 + len(double_newline)] != double_newline:
        raise ValueError("a think block must be followed by a blank line")
    answer = output[end + 1 + len(double_newline) :]
    branches = []
    for budget in range(BUDGET_MAX + 1):
        j = 1 + budget  # <think> is not counted
        if j >= end:
            break
        newline = [] if tokenizer.decode(output[:j]).endswith("\n") else tokenizer.encode("\n")
        branches.append((j, [*newline, tokenizer.think_end_id, *double_newline], answer))
    return branches


def pack(prompt: list[int], output: list[int], branches) -> Packed:
    main = prompt + output
    tokens, targets = list(main[:-1]), list(main[1:])
    for i in range(len(prompt) - 1):
        targets[i] = -1  # no loss on the prompt
    positions = list(range(len(tokens)))
    parents: list[tuple[int, int]] = []  # (first node, main-path nodes it sees) per branch
    for j, forced, answer in branches:
        seq = forced + answer
        first = len(tokens)
        tokens += seq[:-1]
        targets += [t if k + 1 >= len(forced) else -1 for k, t in enumerate(seq[1:])]
        positions += range(len(prompt) + j, len(prompt) + j + len(seq) - 1)
        parents.append((first, len(prompt) + j))
    n = len(tokens)
    visible = np.tril(np.ones((n, n), bool))
    bounds = [first for first, _ in parents] + [n]
    for (first, seen), stop in zip(parents, bounds[1:], strict=True):
        visible[first:stop, :first] = False
        visible[first:stop, :seen] = True
    return Packed(np.array(tokens), np.array(targets), np.array(positions), visible)


def build_training_rows(conversations: list[Conversation], tokenizer: Tokenizer) -> list[Packed]:
    rows: dict[tuple[int, ...], Packed] = {}
    outputs: dict[tuple[int, ...], list[int]] = {}
    for conv in conversations:
        output = tokenizer.encode(conv.output) + [tokenizer.im_end_id]
        branches = budget_branches(output, tokenizer) if conv.thinks else []
        for i, prompt in enumerate(conv.prompts()):
            ids = render_prompt(prompt, tokenizer)
            key = tuple(ids)
            if outputs.setdefault(key, output) != output:
                raise ValueError(f"{conv.name}: a prompt variant is trained toward two outputs")
            # Budget branches on the conversation's own prompt only: they are the costly part.
            rows[key] = pack(ids, output, branches if i == 0 else [])
    _check_consistent(outputs)
    return list(rows.values())


def _check_consistent(outputs: dict[tuple[int, ...], list[int]]) -> None:
    """No context may be trained toward two different next tokens."""
    seen: dict[tuple[int, ...], int] = {}
    for prompt, output in outputs.items():
        full = prompt + tuple(output)
        for i in range(len(prompt), len(full)):
            if seen.setdefault(full[:i], full[i]) != full[i]:
                raise ValueError(f"two targets after the same context (length {i})")


class CompactVocab:
    """Used token ids → rows 0..n-1; every other id shares row n (see the module docstring)."""

    def __init__(self, rows: list[Packed], full_size: int):
        used = set()
        for row in rows:
            used.update(row.tokens.tolist())
            used.update(t for t in row.targets.tolist() if t >= 0)
        self.ids = np.array(sorted(used))
        self.size = len(self.ids) + 1
        self.full_size = full_size
        self.log_unused = math.log(full_size - len(self.ids))
        self._index = np.full(full_size, len(self.ids))
        self._index[self.ids] = np.arange(len(self.ids))

    def encode(self, ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, self._index[np.maximum(ids, 0)], -1)

    def expand(self, table: np.ndarray) -> np.ndarray:
        """(n+1, D) compact rows → (full_size, D): used rows in place, the shared row elsewhere."""
        full = np.repeat(table[-1:], self.full_size, axis=0)
        full[self.ids] = table[:-1]
        return full


@dataclass
class Batch:
    tokens: mx.array  # (B, L) compact ids
    targets: mx.array  # (B, L) compact ids (0 where masked)
    weights: mx.array  # (B, L) 1.0 where the loss applies
    mask: mx.array  # (B, 1, L, L) additive attention mask
    cos: mx.array  # (B, 1, L, head_dim / 2)
    sin: mx.array


def make_batches(
    rows: list[Packed], vocab: CompactVocab, max_tokens: int, config: dict[str, Any] = CONFIG
) -> list[Batch]:
    """Rows of similar length together, padded to a multiple of 32, about max_tokens each."""
    rows = sorted(rows, key=len)
    groups: list[list[Packed]] = [[]]
    for row in rows:
        padded = -(-len(row) // 32) * 32
        if groups[-1] and padded * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
        groups[-1].append(row)
    head_dim, theta = config["head_dim"], config["rope_theta"]
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    batches = []
    for group in groups:
        length = -(-max(len(r) for r in group) // 32) * 32
        tokens = np.zeros((len(group), length), np.int32)
        targets = np.full((len(group), length), -1)
        positions = np.zeros((len(group), length))
        visible = np.broadcast_to(np.eye(length, dtype=bool), (len(group), length, length)).copy()
        for b, row in enumerate(group):
            n = len(row)
            tokens[b, :n] = vocab.encode(row.tokens)
            targets[b, :n] = vocab.encode(row.targets)
            positions[b, :n] = row.positions
            visible[b, :n, :n] = row.visible
        angles = positions[:, None, :, None] * inv_freq
        batches.append(
            Batch(
                mx.array(tokens),
                mx.array(np.maximum(targets, 0).astype(np.int32)),
                mx.array((targets >= 0).astype(np.float32)),
                mx.array(np.where(visible, 0.0, -np.inf)[:, None].astype(np.float32)),
                mx.array(np.cos(angles).astype(np.float32)),
                mx.array(np.sin(angles).astype(np.float32)),
            )
        )
    return batches


# -- the training forward pass --------------------------------------------------------------


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Qwen3's half-split RoPE at explicit positions (mx.fast.rope takes only an offset)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def experts(p: dict, prefix: str, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
    """The routed experts as Experts.reference computes them (tokens sorted by expert)."""
    n, k = indices.shape
    flat = indices.flatten()
    order = mx.stop_gradient(mx.argsort(flat))
    inverse = mx.stop_gradient(mx.argsort(order))
    xs, idx = x[order // k][:, None, :], flat[order]

    def project(h, name):
        w = p[f"{prefix}.switch_mlp.{name}.weight"].swapaxes(-1, -2)
        return mx.gather_mm(h, w, rhs_indices=idx, sorted_indices=True)

    h = nn.silu(project(xs, "gate_proj")) * project(xs, "up_proj")
    y = project(h, "down_proj")[inverse].reshape(n, k, -1)
    return (y * scores[..., None]).sum(axis=1)


def forward(p: dict[str, mx.array], batch: Batch, c: dict[str, Any] = CONFIG) -> mx.array:
    """Qwen3 (MoE, or dense where a layer has no router) over packed rows: qwen3_mlx.model's
    math with a tree mask and explicit positions.

    Returns final-normed hidden states (B, L, D). `check_forward` pins it to the real model.
    """
    heads, kv_heads, head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    top_k, eps = c.get("num_experts_per_tok"), c["rms_norm_eps"]
    B, L = batch.tokens.shape
    x = p["model.embed_tokens.weight"][batch.tokens]
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"

        def proj(h, name, n_heads, pre=pre):
            out = (h @ p[f"{pre}.self_attn.{name}_proj.weight"].T).reshape(B, L, n_heads, head_dim)
            return out.transpose(0, 2, 1, 3)

        h = mx.fast.rms_norm(x, p[f"{pre}.input_layernorm.weight"], eps)
        q = mx.fast.rms_norm(proj(h, "q", heads), p[f"{pre}.self_attn.q_norm.weight"], eps)
        k = mx.fast.rms_norm(proj(h, "k", kv_heads), p[f"{pre}.self_attn.k_norm.weight"], eps)
        q, k = rope(q, batch.cos, batch.sin), rope(k, batch.cos, batch.sin)
        attn = mx.fast.scaled_dot_product_attention(
            q, k, proj(h, "v", kv_heads), scale=head_dim**-0.5, mask=batch.mask
        )
        attn = attn.transpose(0, 2, 1, 3).reshape(B, L, heads * head_dim)
        x = x + attn @ p[f"{pre}.self_attn.o_proj.weight"].T

        h = mx.fast.rms_norm(x, p[f"{pre}.post_attention_layernorm.weight"], eps)
        if f"{pre}.mlp.gate.weight" not in p:  # a dense layer (the draft's)

            def mlp(name, h, pre=pre):
                return h @ p[f"{pre}.mlp.{name}_proj.weight"].T

            x = x + mlp("down", nn.silu(mlp("gate", h)) * mlp("up", h))
            continue
        probs = mx.softmax(h @ p[f"{pre}.mlp.gate.weight"].T, axis=-1)
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        scores = scores / scores.sum(axis=-1, keepdims=True)  # norm_topk_prob
        flat = h.reshape(B * L, -1)
        y = experts(p, f"{pre}.mlp", flat, indices.reshape(B * L, -1), scores.reshape(B * L, -1))
        x = x + y.reshape(B, L, -1)
    return mx.fast.rms_norm(x, p["model.norm.weight"], eps)


def logits(
    p: dict[str, mx.array], batch: Batch, vocab: CompactVocab, config: dict[str, Any] = CONFIG
) -> mx.array:
    """Logits over the compact vocabulary; the shared row stands for every unused token."""
    out = forward(p, batch, config) @ p["model.embed_tokens.weight"].T
    return out + mx.array([0.0] * (vocab.size - 1) + [vocab.log_unused])


def check_forward(
    p: dict[str, mx.array], vocab: CompactVocab, config: dict[str, Any] = CONFIG
) -> None:
    """The training forward must equal qwen3_mlx's model on a plain (unpacked) sequence."""
    model = Model(ModelArgs.from_dict({**config, "vocab_size": vocab.size}))
    model.load_weights(list(p.items()))
    n = 40
    row = Packed(
        np.arange(n) % (vocab.size - 1),
        np.full(n, -1),
        np.arange(n),
        np.tril(np.ones((n, n), bool)),
    )
    batch = make_batches([row], vocab, 10**6, config)[0]
    ours = forward(p, batch, config)[:, :n] @ p["model.embed_tokens.weight"].T
    theirs = model(batch.tokens[:, :n])
    error = mx.abs(ours - theirs).max().item()
    if error > 1e-4:
        raise RuntimeError(f"training forward differs from qwen3_mlx.model by {error}")


# -- quantization as shipped ------------------------------------------------------------------


def as_shipped(p: dict[str, mx.array], recipe: Recipe = DEMO) -> dict[str, mx.array]:
    """Weights rounded exactly as the exported checkpoint holds them (straight-through gradient)."""
    out = {}
    for path, w in p.items():
        spec = recipe.quant_spec(path)
        if spec is None:
            out[path] = w
        else:
            group, bits = spec
            shipped = mx.dequantize(*mx.quantize(w, group, bits), group, bits)
            out[path] = w + mx.stop_gradient(shipped - w)
    return out


# -- training ------------------------------------------------------------------------------


def loss_fn(p, batch: Batch, vocab: CompactVocab, quantized: bool, recipe: Recipe) -> mx.array:
    if quantized:
        p = as_shipped(p, recipe)
    out = logits(p, batch, vocab, recipe.config)
    losses = nn.losses.cross_entropy(out, batch.targets, reduction="none")
    return (losses * batch.weights).sum() / batch.weights.sum()


def margins(p, batch: Batch, vocab: CompactVocab, recipe: Recipe = DEMO) -> np.ndarray:
    """Per loss node, as shipped: target logit minus the best other logit."""
    out = logits(as_shipped(p, recipe), batch, vocab, recipe.config)
    target = mx.take_along_axis(out, batch.targets[..., None], axis=-1)[..., 0]
    is_target = mx.arange(vocab.size) == batch.targets[..., None]
    others = mx.where(is_target, -mx.inf, out).max(axis=-1)
    gaps = np.array(target - others)
    return gaps[np.array(batch.weights) > 0]


def train(
    rows: list[Packed], vocab: CompactVocab, args, recipe: Recipe = DEMO, log=print
) -> tuple[dict, int]:
    """Float warm-up, then quantization-aware epochs until the recipe says stop: every target
    ahead by 2 x MIN_MARGIN, or (a draft) its share of greedy agreement reached."""
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    init = Model(ModelArgs.from_dict({**recipe.config, "vocab_size": vocab.size}))
    params = dict(tree_flatten(init.parameters()))
    check_forward(params, vocab, recipe.config)
    batches = make_batches(rows, vocab, args.batch_tokens, recipe.config)
    total = args.max_epochs * len(batches)
    warmup = min(100, total // 10)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(args.lr / 10, args.lr, warmup),
            optim.cosine_decay(args.lr, total, args.lr / 10),
        ],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    optimizer.init(params)
    grads = {
        q: mx.value_and_grad(partial(loss_fn, vocab=vocab, quantized=q, recipe=recipe))
        for q in (False, True)
    }
    log(
        f"{sum(len(r) for r in rows)} packed tokens in {len(rows)} rows, "
        f"{len(batches)} batches, {vocab.size - 1} distinct tokens"
    )
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, args.max_epochs + 1):
        quantized = epoch > args.float_epochs
        losses = []
        for i in rng.permutation(len(batches)):
            loss, g = grads[quantized](params, batches[i])
            params = optimizer.apply_gradients(g, params)
            mx.eval(loss, params, optimizer.state)
            losses.append(loss.item())
        if epoch % args.eval_every and epoch != args.max_epochs:
            continue
        gaps = np.concatenate([margins(params, b, vocab, recipe) for b in batches])
        agreement = float((gaps > 0).mean())  # targets that are the greedy choice
        log(
            f"epoch {epoch:4d}  loss {np.mean(losses):.4f}  min margin {gaps.min():7.3f}  "
            f"below {MIN_MARGIN}: {int((gaps < MIN_MARGIN).sum()):4d}/{gaps.size}  "
            f"greedy {agreement:6.1%}  "
            f"{'qat' if quantized else 'float'}  {time.perf_counter() - start:6.0f}s"
        )
        if not quantized:
            continue
        if recipe.agreement is None and gaps.min() >= 2 * MIN_MARGIN:
            break
        if recipe.agreement is not None and agreement >= recipe.agreement:
            break
    return params, epoch


# -- export -----------------------------------------------------------------------------


def export(
    params: dict[str, mx.array], vocab: CompactVocab, tokenizer_dir: Path, out: Path
) -> None:
    """Write the shippable demo (mlx-lm layout, quantized, with its tokenizer) into `out`."""
    export_weights(params, vocab, DEMO, out)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    shutil.copyfile(tokenizer_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    write_compact_tokenizer(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")


def export_weights(
    params: dict[str, mx.array], vocab: CompactVocab, recipe: Recipe, out: Path
) -> None:
    """The quantized weights (full vocabulary), their index and config.json."""
    params = dict(params)
    embed = np.array(params.pop("model.embed_tokens.weight"))
    params["model.embed_tokens.weight"] = mx.array(vocab.expand(embed))
    full = Model(ModelArgs.from_dict(recipe.config))
    full.load_weights(list(params.items()), strict=True)

    overrides = {}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        group, bits = recipe.quant_spec(f"{path}.weight")
        if bits != BITS:
            overrides[path] = {"group_size": group, "bits": bits}
            return overrides[path]
        return True

    nn.quantize(full, group_size=GROUP_SIZE, bits=BITS, class_predicate=predicate)
    weights = dict(tree_flatten(full.parameters()))
    save_shards(weights, out)

    quantization = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine", **overrides}
    config = {**recipe.config, "quantization": quantization, "quantization_config": quantization}
    _write_json(out / "config.json", config)


def write_compact_tokenizer(source: Path, target: Path) -> None:
    """tokenizer.json without whitespace and with merges as "a b" strings: 6.9 MB, not 8.9.

    `tokenizers` reads both merge spellings (the hub's Qwen files use the string one); byte-level
    tokens never contain a space, so the string form is unambiguous.
    """
    data = json.loads(source.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    if merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            raise ValueError(f"{source}: a merge contains a space; keep the list form")
        data["model"]["merges"] = [" ".join(pair) for pair in merges]
    target.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- verification ---------------------------------------------------------------------------


def greedy(model: Model, prompt: list[int], max_tokens: int, stop: int) -> tuple[list[int], float]:
    """Greedy decoding with a KV cache → (tokens, smallest top-1/top-2 logit gap)."""
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    tokens = mx.array([prompt])
    out, smallest = [], math.inf
    for _ in range(max_tokens):
        logits = model.logits(model.model(tokens, cache)[:, -1])[0].astype(mx.float32)
        top2 = mx.topk(logits, 2)
        token = int(mx.argmax(logits).item())
        smallest = min(smallest, float(top2.max() - top2.min()))
        out.append(token)
        if token == stop:
            break
        tokens = mx.array([[token]])
    return out, smallest


def verify(model_dir: Path, conversations: list[Conversation], log=print) -> float:
    """Greedy-decode every prompt with the shipped files; raise unless all reproduce."""
    from qwen3_mlx.loading import load_model

    model, _ = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    worst = math.inf
    failures = []
    for conv in conversations:
        expected = tokenizer.encode(conv.output) + [tokenizer.im_end_id]
        for i, prompt in enumerate(conv.prompts()):
            got, gap = greedy(
                model, render_prompt(prompt, tokenizer), len(expected) + 8, tokenizer.im_end_id
            )
            worst = min(worst, gap)
            if got != expected or gap < MIN_MARGIN:
                text = tokenizer.decode(got)
                failures.append(f"{conv.name}[{i}]: margin {gap:.3f}, got {text!r}")
    for line in failures:
        log("FAIL " + line)
    if failures:
        raise SystemExit(
            f"{len(failures)} prompt(s) not reproduced; the demo model was not written"
        )
    return worst


# -- main ------------------------------------------------------------------------------------


def training_set(
    tokenizer_dir: Path,
) -> tuple[Tokenizer, list[Conversation], list[Packed], CompactVocab]:
    """Qwen3's tokenizer (built into `tokenizer_dir`), the conversations, the packed training
    rows and their compact vocabulary."""
    build_qwen3_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    conversations = all_conversations()
    rows = build_training_rows(conversations, tokenizer)
    vocab = CompactVocab(rows, CONFIG["vocab_size"])
    print(
        f"{len(conversations)} conversations, {sum(len(c.prompts()) for c in conversations)} prompts"
    )
    return tokenizer, conversations, rows, vocab


def install(out: Path, build) -> Any:
    """`build(staging)` beside `out`, then the staging directory swapped in (a build that fails
    or refuses its result never leaves a broken directory). Returns what `build` returns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-build-", dir=out.parent))
    try:
        result = build(staging)
        staging.chmod(0o755)
        backup = out.with_name(out.name + ".old")
        if out.exists():
            out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def with_defaults(args: argparse.Namespace, recipe: Recipe, out: Path) -> argparse.Namespace:
    """The recipe's epochs, evaluation interval and output directory where the command line
    gave none."""
    args.out = (args.out or out).resolve()
    if args.float_epochs is None:
        args.float_epochs = recipe.float_epochs
    if args.max_epochs is None:
        args.max_epochs = recipe.max_epochs
    if args.eval_every is None:
        args.eval_every = recipe.eval_every
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--draft",
        action="store_true",
        help="train the demo's draft model instead (see convert/train_demo_draft.py)",
    )
    parser.add_argument(
        "--out", type=Path, help="default: qwen3_mlx/assets/demo (--draft: assets/demo-draft)"
    )
    parser.add_argument(
        "--target",
        type=Path,
        default=DEFAULT_OUT,
        help="--draft: the model it drafts for, its agreement reported (default: the demo)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per step")
    recipes = "(default: the recipe's; the demo's is {}, --draft's in train_demo_draft.DRAFT)"
    parser.add_argument("--float-epochs", type=int, help=recipes.format(DEMO.float_epochs))
    parser.add_argument("--max-epochs", type=int, help=recipes.format(DEMO.max_epochs))
    parser.add_argument("--eval-every", type=int, help=recipes.format(DEMO.eval_every))
    args = parser.parse_args(argv)
    if args.draft:
        from convert import train_demo_draft

        return train_demo_draft.main(args)
    args = with_defaults(args, DEMO, DEFAULT_OUT)
    started = time.perf_counter()

    tokenizer_dir = Path(tempfile.mkdtemp(prefix="demo-tokenizer-"))
    try:
        _, conversations, rows, vocab = training_set(tokenizer_dir)
        params, epochs = train(rows, vocab, args)

        def build(staging: Path) -> float:
            export(params, vocab, tokenizer_dir, staging)
            records = [conversation_record(c) for c in conversations if c.record]
            _write_json(staging / "conversations.json", records)
            worst = verify(staging, conversations)
            from convert.demo_time import report_copying

            report_copying(staging)
            return worst

        worst = install(args.out, build)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(
        f"wrote {args.out} ({size / 1e6:.1f} MB) after {epochs} epochs in "
        f"{time.perf_counter() - started:.0f}s; smallest greedy margin {worst:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The server's command line: every `python -m qwen3_mlx.server` option, its default and its help
(docs/server.md lists them the same way)."""

from __future__ import annotations

import argparse


def build_parser(prog: str = "python -m qwen3_mlx.server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="An OpenAI- and LM Studio-compatible server for Qwen3 on MLX.",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        metavar="PATH_OR_ID",
        help="model directory or hub id, loaded at start; repeat to serve several (default: "
        "none; models load on demand from the model directories)",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="serve the Qwen3 checkpoints in DIR, each loaded when a request names it; repeat "
        "for several (default without --model: Hugging Face's cache and ~/.lmstudio/models, "
        "where they exist, else the built-in demo model; with --model: none)",
    )
    p.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="idle seconds before a model loaded on demand is unloaded; a request's ttl "
        "(LM Studio) or keep_alive (Ollama) wins; negative: never (default: 3600)",
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        metavar="N",
        help="models loaded at once: loading another unloads the least recently used idle one "
        "(default: no limit but memory)",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH_OR_ID",
        help="serve this checkpoint as an embedding model (for ones without sentence-transformers "
        "files; default: none)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)"
    )
    p.add_argument("--port", type=int, default=1234, help="port to listen on (default: 1234)")
    p.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help="comma-separated Host header names to serve besides localhost and the --host "
        "address ('*.example.com' for subdomains, '*' for any); others get 403, against DNS "
        "rebinding (see docs/server.md; default: none)",
    )
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' (default: no key needed)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection whose client takes longer than this to send a request's "
        "headers, or pauses this long within its body (default: 30)",
    )
    p.add_argument(
        "--cors",
        action="store_true",
        help="allow cross-origin requests from browsers (default: off)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="requests decoded together in one batch (default: 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting beyond those; more get 503 (default: 64)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        help="refuse requests asking for more output tokens than this (default: no limit; a "
        "request that sets no max_tokens generates until the model's context is full, or up to "
        "this limit)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=16.0, help="largest request body (default: 16 MB)"
    )
    p.add_argument(
        "--responses-store-size",
        type=int,
        default=512,
        help="Responses API responses kept for GET and previous_response_id, the latest first "
        "(default: 512; 0 keeps none)",
    )
    p.add_argument(
        "--responses-max-age",
        type=float,
        default=3600.0,
        help="seconds a stored response is kept (default: 3600)",
    )
    p.add_argument(
        "--long-context",
        action="store_true",
        help="YaRN to 131,072 tokens (Qwen's factor 4 over 32,768), as the other CLIs have it",
    )
    p.add_argument(
        "--context-length",
        type=int,
        help="override the models' context length (default: the checkpoint's, from "
        "max_position_embeddings and rope_scaling)",
    )
    p.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=2048,
        help="memory for KV caches kept for reuse by later requests (default: 2048 MB)",
    )
    p.add_argument(
        "--prefill-step",
        type=int,
        default=512,
        help="prompt tokens processed between decode steps (default: 512)",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        help="quantize every request's KV cache to this many bits (4 or 8: ~3.5x or ~2x less "
        "memory per token; default: not quantized)",
    )
    p.add_argument(
        "--kv-group-size",
        type=int,
        default=64,
        help="values sharing one scale in the quantized KV cache (default: 64)",
    )
    p.add_argument(
        "--max-kv-size",
        type=int,
        help="while generating, each request attends to its first 4 tokens and its latest ones, "
        "this many in all, so long replies need bounded memory (the prompt is read whole; "
        "default: no window)",
    )
    p.add_argument(
        "--draft-model",
        help="speculative decoding: a smaller model with the same vocabulary (e.g. Qwen3-0.6B) "
        "drafts tokens for a request decoding alone; same output, fewer passes (default: none)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="speculative decoding without a draft model: draft from the text so far, where "
        "its last N tokens occurred before (default: off)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=3,
        help="tokens drafted per pass (default: %(default)s)",
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="start listening without first compiling the decode step for every batch size "
        "(the first requests then pay for it; default: warm up first)",
    )
    p.add_argument(
        "--parallel",
        choices=["tensor", "expert", "pipeline"],
        help="under mlx.launch: split the chat models over the ranks; rank 0 serves "
        "(see docs/distributed.md; default: each model whole in one process)",
    )
    p.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        help="don't serve the chat page at / (default: served; see the README's Web chat)",
    )
    p.add_argument(
        "--reasoning-format",
        choices=["separate", "raw"],
        default="separate",
        help="where replies put the model's thinking: 'separate' (reasoning_content) or 'raw' "
        "(the <think> block stays in content); a request's reasoning_format wins (default: "
        "separate)",
    )
    p.add_argument(
        "--mcp-config",
        metavar="FILE",
        help="start the MCP servers of this mcp.json (LM Studio's and Cursor's format: "
        '{"mcpServers": {"time": {"command": "uvx", "args": ["mcp-server-time"]}}}) and run '
        "their tools for requests that ask (`mcp` on /v1/chat/completions, `integrations` on "
        "/api/v1/chat; default: none)",
    )
    p.add_argument(
        "--mcp-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest an MCP tool call may take; a slower one is an error result for the "
        "model (default: 30)",
    )
    p.add_argument(
        "--mcp-max-calls",
        type=int,
        default=8,
        metavar="N",
        help="MCP tool calls the server runs for one request; then the model answers "
        "without tools (default: 8)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: info)",
    )
    return p

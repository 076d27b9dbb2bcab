"""The server's host work for one row and one token, outside the model step.

    python -m benchmarks.host_per_row [--tokens 2000] [--out STEM]

Each decode step the engine thread turns every row's token into text (`Sequence.append`:
detokenizer, stop strings, the reasoning/tool-call parser) and hands an event to the event loop
(`call_soon_threadsafe`); the loop writes the row's SSE chunk (a pydantic reply object, dumped to
JSON). This times those three on the demo model's tokenizer, over English text, so the cost of
32 rows a step can be set beside a GPU step's ~10 ms. A JSON file with the command is written
to benchmarks/results/ (no plot: three numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all. "


def per_call(fn, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n


def main(argv: list[str] | None = None) -> dict:
    import mlx.core as mx

    from qwen3_mlx.assets import DEMO_MODEL_PATH
    from qwen3_mlx.generation import Sequence
    from qwen3_mlx.sampling import SamplingParams
    from qwen3_mlx.server.models import load_served_model
    from qwen3_mlx.server.output.completions import CompletionReply

    p = argparse.ArgumentParser(prog="python -m benchmarks.host_per_row")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--out", help="output stem (default: results/host_per_row_<machine>_<date>)")
    args = p.parse_args(argv)
    served = load_served_model(str(DEMO_MODEL_PATH))
    tokenizer, vocab = served.tokenizer, served.model.args.vocab_size
    ids = tokenizer.encode(TEXT * (args.tokens // 10 + 1))[: args.tokens]

    def sequence(thinking: bool) -> Sequence:
        params = SamplingParams(temperature=0.0, max_tokens=len(ids) + 1)
        state = "answer" if thinking else None
        return Sequence(
            tokenizer, [1, 2, 3], params.resolve(thinking=thinking), vocab_size=vocab,
            **({"prompt_state": state} if state else {}),
        )  # fmt: skip

    raw, chat = sequence(False), sequence(True)
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reply = CompletionReply(
        id="cmpl-0", created=0, model=served, echoes=[None], want_logprobs=False, top_n=0,
        leaders=[0], lmstudio=False,
    )  # fmt: skip

    class Step:
        text, token, logprobs, tool_calls, finish_reason = " fox", 5, None, [], None

    figures = {
        "sequence_append_raw_us": 1e6 * per_call(lambda i: raw.append(ids[i]), len(ids)),
        "sequence_append_chat_us": 1e6 * per_call(lambda i: chat.append(ids[i]), len(ids)),
        "hand_off_us": 1e6 * per_call(lambda i: loop.call_soon_threadsafe(queue.put_nowait, i), 20_000),
        "completion_chunk_us": 1e6 * per_call(lambda i: reply.step(0, Step), 5_000),
    }  # fmt: skip
    loop.close()
    per_row = (
        figures["sequence_append_chat_us"] + figures["hand_off_us"] + figures["completion_chunk_us"]
    )
    record = {
        "command": "python -m benchmarks.host_per_row"
        + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "machine": platform.node(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"mlx": mx.__version__},
        "tokens": len(ids),
        **{k: round(v, 2) for k, v in figures.items()},
        "per_row_per_token_us": round(per_row, 2),
        "per_step_at_32_rows_ms": round(32 * per_row / 1000, 3),
    }
    stem = args.out or str(RESULTS / f"host_per_row_{platform.node()}_{time.strftime('%Y-%m-%d')}")
    Path(stem + ".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()

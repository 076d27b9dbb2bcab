"""The server at the model's speed: this server and `mlx_lm.server` on the same checkpoint, each in
turn, streaming over HTTP, with `stream_generate` in process as the ceiling.

    python -m benchmarks.serve --preset qwen3-30b-a3b --streams 1,8,32 --prompt 128,2048 \\
        --max-tokens 200 --impl ours,mlx-lm

`--preset` writes a checkpoint of random weights of that shape (benchmarks/models.py, 4-bit g64,
the real Qwen tokenizer from the demo model) under --workdir once; `--model DIR` serves an
existing one. Every request is a raw-text completion of about `--prompt` tokens, different from
token one on (no prefix reuse), greedy, with the end-of-turn ids banned by `logit_bias`, so every
stream decodes exactly --max-tokens tokens. Per server, per (streams, prompt) configuration and
per round (the first after start-up, then `--rounds - 1` more):
  - aggregate tok/s: all generated tokens / wall time from the first request sent to the last
    token received;
  - per stream: decode tok/s after its first token, and time to first token (p50, p99, max).
Writes <out>.json and <out>.png with the command, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
sys.path.insert(0, str(ROOT))

from benchmarks.figures import save_with_command  # noqa: E402
from tests.server_process import free_port, wait_until_healthy  # noqa: E402

END_OF_TURN = {"151643": -100, "151645": -100}


def write_checkpoint(preset: str, directory: Path, bits: int, group_size: int) -> Path:
    """A checkpoint of random weights of `preset`'s shape, in mlx-lm's layout (written once)."""
    import mlx.core as mx

    from qwen3_mlx.assets import DEMO_MODEL_PATH

    from .models import PRESETS, build

    done = directory / ".complete"
    if done.exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    _, weights = build(preset, bits, group_size, impls=("mlx-lm",))
    config = dict(PRESETS[preset])
    quantization = {"group_size": group_size, "bits": bits}
    for name in weights:
        if name.endswith("mlp.gate.scales"):
            quantization[name[: -len(".scales")]] = {"group_size": 64, "bits": 8}
    config["quantization"] = quantization
    config["architectures"] = [
        "Qwen3MoeForCausalLM" if config["model_type"] == "qwen3_moe" else "Qwen3ForCausalLM"
    ]
    shard, size, index, n = {}, 0, {}, 0
    names = sorted(weights)

    def flush():
        nonlocal shard, size, n
        n += 1
        file = f"model-{n:05d}.safetensors"
        mx.save_safetensors(str(directory / file), shard, {"format": "mlx"})
        index.update({k: file for k in shard})
        shard, size = {}, 0

    for name in names:
        shard[name] = weights[name]
        size += weights[name].nbytes
        if size > 4 << 30:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL_PATH / name, directory / name)
    done.write_text("ok")
    return directory


# -- servers ------------------------------------------------------------------------------------


class Server:
    def __init__(self, impl: str, model: Path, port: int, concurrency: int, log: Path):
        if impl == "ours":
            args = ["-m", "qwen3_mlx.server", "--port", str(port), "--model", str(model)]
            args += ["--max-concurrency", str(concurrency), "--max-queue", str(4 * concurrency)]
        else:
            args = ["-m", "mlx_lm.server", "--port", str(port), "--model", str(model)]
            args += ["--decode-concurrency", str(concurrency)]
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.log_path = log
        # mlx_lm.server's /v1/models fails without a Hugging Face cache: /health is polled.
        wait_until_healthy(self, 900, f"{impl} server")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prompt_text(index: int, tokens: int) -> str:
    # " hello" is one token in Qwen's vocabulary; the leading number makes every prompt differ
    # from its first token on.
    return f"{index}:" + " hello" * max(1, tokens - 3)


def one_stream(base: str, model: str, prompt: str, max_tokens: int, out: dict) -> None:
    try:
        _stream(base, model, prompt, max_tokens, out)
    except Exception as e:  # reported by run_round, for every stream that failed
        out["error"] = f"{type(e).__name__}: {e}"


def _stream(base: str, model: str, prompt: str, max_tokens: int, out: dict) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": END_OF_TURN,
    }
    sent = time.perf_counter()
    first = last = None
    chunks = 0
    times = out.get("times")  # a list to record every chunk's arrival in (the join scenario)
    with httpx.Client(timeout=600) as client:
        with client.stream("POST", base + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                if times is not None:
                    times.append(now)
    out.update(sent=sent, first=first, last=last, chunks=chunks)


def run_round(base: str, model: str, streams: int, prompt: int, max_tokens: int, tag: int):
    results = [{} for _ in range(streams)]
    threads = [
        threading.Thread(
            target=one_stream,
            args=(base, model, prompt_text(tag * 1000 + i, prompt), max_tokens, results[i]),
        )
        for i in range(streams)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r.get("error", "no tokens") for r in results if not r.get("last")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {streams} streams failed: {failed[0]}")
    end = max(r["last"] for r in results)
    ttft = sorted(r["first"] - r["sent"] for r in results)
    decode = [
        (max_tokens - 1) / (r["last"] - r["first"]) for r in results if r["last"] > r["first"]
    ]
    return {
        "aggregate_tok_s": streams * max_tokens / (end - start),
        "median_stream_tok_s": statistics.median(decode) if decode else 0.0,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "ttft_max_s": ttft[-1],
        "wall_s": end - start,
    }


def run_join(base: str, model: str, running: int, prompt: int, max_tokens: int) -> dict:
    """`running` streams decode; once each has `max_tokens // 4` tokens, a newcomer with a prompt of
    `prompt` tokens joins. Their tok/s while it prefills (from its request to its first token)
    against the same span just before it, and the newcomer's time to first token."""
    results = [{"times": []} for _ in range(running)]
    threads = [
        threading.Thread(
            target=one_stream,
            args=(base, model, prompt_text(7000 + i, 128), max_tokens, results[i]),
        )
        for i in range(running)
    ]
    for t in threads:
        t.start()
    while any(len(r["times"]) < max_tokens // 4 for r in results) and any(
        t.is_alive() for t in threads
    ):
        time.sleep(0.01)
    newcomer: dict = {}
    one_stream(base, model, prompt_text(7999, prompt), 8, newcomer)
    for t in threads:
        t.join()
    if "error" in newcomer or any("error" in r for r in results):
        raise RuntimeError(newcomer.get("error") or next(r["error"] for r in results))
    start, first = newcomer["sent"], newcomer["first"]
    span = first - start

    def rate(a: float, b: float) -> float:
        return sum(a <= t < b for r in results for t in r["times"]) / (b - a)

    end = min(first, min(r["times"][-1] for r in results))  # while all of them still ran
    before, during = rate(start - (end - start), start), rate(start, end)
    return {
        "newcomer_ttft_s": span,
        "measured_over_s": end - start,
        "running_tok_s_before": before,
        "running_tok_s_during_prefill": during,
        "running_speed_kept": during / before if before else 0.0,
    }


def ceiling(model_dir: Path, prompts: list[int], max_tokens: int) -> list[dict]:
    """`stream_generate` in a process of its own: the single-stream ceiling.

    Not in this process: MLX keeps a freed model's memory in its buffer cache, and on the CUDA
    backend (managed memory) two processes holding more than the card has slow each other by
    seconds a step as pages migrate. The servers measured next must have the card to
    themselves."""
    command = [sys.executable, "-m", "benchmarks.serve", "--model", str(model_dir)]
    command += ["--prompt", ",".join(map(str, prompts)), "--max-tokens", str(max_tokens)]
    done = subprocess.run(
        [*command, "--ceiling-only"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"stream_generate failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ceiling_here(model_dir: Path, prompts: list[int], max_tokens: int) -> list[dict]:
    from qwen3_mlx import load, stream_generate

    model, tokenizer = load(model_dir)
    rows = []
    for prompt in prompts:
        for attempt in range(2):  # the first compiles
            responses = stream_generate(
                model,
                tokenizer,
                prompt=prompt_text(99_000 + attempt, prompt),
                max_tokens=max_tokens,
                temperature=0,
                logit_bias={int(k): v for k, v in END_OF_TURN.items()},
            )
            response = None
            for response in responses:  # noqa: B007 (the last one carries the stats)
                pass
        rows.append(
            {
                "impl": "stream_generate",
                "streams": 1,
                "prompt": prompt,
                "decode_tok_s": response.stats.generation_tps,
                "ttft_s": response.stats.time_to_first_token,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve", description=__doc__.split("\n")[0]
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="random weights of this shape (benchmarks/models.py)")
    source.add_argument("--model", help="an MLX checkpoint directory")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--workdir", default="/tmp/qwen3-mlx-bench", help="where presets are written")
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--prompt", default="128,2048", help="prompt lengths in tokens")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--impl",
        default="ours,stream_generate,mlx-lm",
        help="in this order; stream_generate runs in this process (the single-stream ceiling)",
    )
    p.add_argument(
        "--join",
        default="",
        help="RUNNING:PROMPT, e.g. 7:2048: a newcomer with a PROMPT-token prompt joins RUNNING "
        "decoding streams (max-tokens x 16 each); their speed while it prefills, its TTFT",
    )
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    p.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="output stem (default: results/serve_<model>_<machine>_<date>)")
    args = p.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]
    prompts = [int(x) for x in args.prompt.split(",")]
    name = args.preset or Path(args.model).name
    if args.preset:
        model_dir = write_checkpoint(
            args.preset,
            Path(args.workdir) / f"{args.preset}-{args.bits}bit",
            args.bits,
            args.group_size,
        )
    else:
        model_dir = Path(args.model)

    if args.ceiling_only:  # the child process of `ceiling`: rows as one JSON line
        print(json.dumps(_ceiling_here(model_dir, prompts, args.max_tokens)))
        return 0
    rows, ceiling_rows, joins = [], [], []
    stem = args.out or str(RESULTS / f"serve_{name}_{platform.node()}_{time.strftime('%Y-%m-%d')}")

    def save() -> dict:  # after every configuration: a run cut short keeps what it measured
        record = {
            "command": "python -m benchmarks.serve "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": name,
            "machine": platform.node(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d"),
            "versions": _versions(),
            "max_tokens": args.max_tokens,
            "rows": rows,
            "ceiling": ceiling_rows,
            "join": joins,
            "summary": summarize(rows, ceiling_rows),
        }
        Path(stem + ".json").write_text(json.dumps(record, indent=2))
        return record

    impls = args.impl.split(",")
    for impl in impls:
        if impl == "stream_generate":
            ceiling_rows.extend(ceiling(model_dir, prompts, args.max_tokens))
            for row in ceiling_rows:
                print(f"stream_generate prompt {row['prompt']:5d}: {row['decode_tok_s']:.1f} tok/s")
            save()
            continue
        log = Path(args.workdir) / f"server-{impl}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        port = args.port or free_port()
        joining = [int(x) for x in args.join.split(":")] if args.join and impl == "ours" else []
        server = Server(impl, model_dir, port, max(streams + [j + 1 for j in joining[:1]]), log)
        print(f"{impl}: up in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            if joining:
                try:
                    row = run_join(server.base, str(model_dir), *joining, 16 * args.max_tokens)
                except RuntimeError as e:
                    row = {"error": str(e)}
                row.update(impl=impl, join=args.join)
                joins.append(row)
                save()
                print(f"{impl} join {args.join}: {json.dumps(row)}", flush=True)
            for round_index in range(args.rounds):
                for prompt in prompts:
                    for n in streams:
                        tag = round_index * 100 + prompts.index(prompt) * 10 + streams.index(n)
                        row = run_round(
                            server.base, str(model_dir), n, prompt, args.max_tokens, tag
                        )
                        row.update(impl=impl, streams=n, prompt=prompt, round=round_index + 1)
                        rows.append(row)
                        save()
                        print(
                            f"{impl:7s} round {round_index + 1} prompt {prompt:5d} streams {n:3d}: "
                            f"{row['aggregate_tok_s']:8.1f} tok/s together, "
                            f"{row['median_stream_tok_s']:7.1f} per stream, TTFT p50 "
                            f"{row['ttft_p50_s']:.3f} s p99 {row['ttft_p99_s']:.3f} s",
                            flush=True,
                        )
        finally:
            server.stop()
    record = save()
    plot(record, Path(stem + ".png"))
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {stem}.json and .png")
    return 0


def summarize(rows: list[dict], ceiling_rows: list[dict]) -> dict:
    """The issue's ratios, from the last round of each configuration."""
    last = {}
    for row in rows:
        last[(row["impl"], row["streams"], row["prompt"])] = row
    out = {}
    for (impl, n, prompt), row in sorted(last.items()):
        one = last.get((impl, 1, prompt))
        key = f"{impl}/p{prompt}/s{n}"
        out[key] = {"aggregate_tok_s": round(row["aggregate_tok_s"], 1)}
        if one and n > 1:
            out[key]["vs_own_1_stream"] = round(row["aggregate_tok_s"] / one["aggregate_tok_s"], 2)
        peer = last.get(("mlx-lm", n, prompt))
        if impl == "ours" and peer:
            out[key]["vs_mlx_lm"] = round(row["aggregate_tok_s"] / peer["aggregate_tok_s"], 2)
        firsts = [r for r in rows if (r["impl"], r["streams"], r["prompt"]) == (impl, n, prompt)]
        if len(firsts) > 1 and firsts[-1]["ttft_max_s"] > 0:
            out[key]["first_round_worst_ttft_vs_later"] = round(
                firsts[0]["ttft_max_s"] / firsts[-1]["ttft_max_s"], 2
            )
        ceiling_row = next((c for c in ceiling_rows if c["prompt"] == prompt), None)
        if ceiling_row and n == 1:
            out[key]["vs_stream_generate"] = round(
                row["median_stream_tok_s"] / ceiling_row["decode_tok_s"], 3
            )
    return out


def _versions() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("mlx", "mlx-lm", "qwen3-mlx"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return versions


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = {}
    for row in record["rows"]:
        last[(row["impl"], row["streams"], row["prompt"])] = row
    impls = sorted({k[0] for k in last})
    configs = sorted({(k[2], k[1]) for k in last})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs)), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        values = [last.get((impl, n, p), {}).get("aggregate_tok_s", 0) for p, n in configs]
        ax.bar([i + j * width for i in range(len(configs))], values, width, label=impl)
    for c in record["ceiling"]:
        ax.axhline(c["decode_tok_s"], linestyle=":", color="gray")
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"p{p}\n{n} streams" for p, n in configs])
    ax.set_ylabel("tokens/s, all streams together")
    ax.set_title(f"{record['model']} served over HTTP ({record['date']}); dotted: stream_generate")
    ax.legend()
    save_with_command(fig, path, record["command"])


if __name__ == "__main__":
    raise SystemExit(main())

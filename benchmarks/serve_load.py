"""Server load test: every request isolated, under load, round after round.

Starts `python -m qwen3_mlx.server` (a real process, on a free port, `--max-body-mb 32`), runs
one unmeasured warm-up round (the same streams, no poison), then `--rounds` rounds. Each round
sends `--streams` concurrent streaming chat requests over the demo model's canned prompts
(qwen3_mlx/assets/demo/conversations.json, with their tools and thinking settings) and, once the
first of them is generating, one "poison" request, rotating over:

    frequency_penalty  frequency_penalty: 0.5            200, formerly poison: must stream to the end
    top_k              top_k: 2**63                      400
    surrogate          a lone "\\ud800" in the content    400 (raw JSON bytes)
    template_kwargs    chat_template_kwargs.messages     400
    tool_schema        tool parameters not a JSON Schema 400
    huge_prompt        a 15 MB prompt (under the 32 MB body limit)   400
    bad_host           Host: evil.example                403

A quarter of the streams (every 4th) close their response after 3-5 chunks; they ask for
8 x --max-tokens with end-of-turn suppressed, so they are surely still generating when they
leave, and a server that kept decoding them would not get back to idle in time.

After each round: /health is polled until running, prefilling and queued are all 0 (up to
--idle-timeout s), and the server's VmRSS is read from /proc/PID/status.

Pass (exit 0) when, in every round:
  - each poison request got its expected status (and frequency_penalty streamed to the end),
  - every other stream completed ([DONE], a finish_reason, usage, no error event) or was the
    client's own mid-stream disconnect: zero errors in non-poison streams (warm-up included),
  - the engine's `failed` counter did not move, its `cancelled` counter rose by at least the
    number of streams that left, and the server got back to idle;
and over the run: the server is still up, and RSS is flat:
    final-round RSS <= first-round RSS x 1.15 + 50 MB
Round 1 comes after a full-size warm-up round, so its RSS already holds the compiled graphs, the
caches and the allocator's arenas of this load; the 15 % + 50 MB absorbs the round-to-round
noise of glibc's heap (+-30 MB on the demo model), yet fails a leak of a few MB per request
(33 requests a round). It also fails glibc's retention after 15 MB bodies under load: with a
huge_prompt every round the demo server grows ~15 MB a round (350 -> 570 MB over 20 rounds,
flattening), and stays flat with MALLOC_MMAP_THRESHOLD_=131072 in its environment, so that is
the allocator keeping freed memory, not live objects. One huge_prompt in `--rounds 7` stayed
within, narrowly (+27 and +88 MB of the +103 MB allowed, in two runs on 2 CPUs).
Exit 1 otherwise, with the failures listed.

    python -m benchmarks.serve_load [--rounds 3] [--streams 32] [--max-tokens 64] [--model PATH]
                                    [--poisons-per-round 1] [--poisons a,b,...] [--out STEM]

Writes STEM.json (the command, settings, per-round figures, per-request records, verdict) and
STEM.png (RSS and tok/s per round); STEM defaults to
benchmarks/results/serve_load_<model>_<machine>_<date>. tok/s counts the completion tokens of
the streams that completed, over the round's wall time; TTFT is from sending the request to the
first delta with text, reasoning or a tool call, over all non-poison streams (with more streams
than --max-concurrency, 16 by default, the rest wait in the queue: p99 includes that wait).

With one poison a round, the 7 kinds take 7 rounds to go round once (the default 3 rounds send
the first 3; `--rounds 7` sends each once); `--poisons-per-round 4` covers all 7 in 2 rounds
(tests/test_serve_load.py, the in-process CI version on 2 x 12 streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

CONVERSATIONS = ROOT / "qwen3_mlx" / "assets" / "demo" / "conversations.json"
NO_END = {"151645": -100, "151643": -100}  # <|im_end|>, <|endoftext|>: keep generating
HELLO = [{"role": "user", "content": "Hello"}]
SURROGATE_MARK = "<lone-surrogate>"
BAD_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": 3}},
}

# name -> the status it must get. Order is the rotation order.
EXPECTED: dict[str, int] = {
    "frequency_penalty": 200,
    "top_k": 400,
    "surrogate": 400,
    "template_kwargs": 400,
    "tool_schema": 400,
    "huge_prompt": 400,
    "bad_host": 403,
}
RSS_FACTOR = 1.15
RSS_SLACK_MB = 50.0
RSS_RULE = f"final-round RSS <= first-round RSS x {RSS_FACTOR} + {RSS_SLACK_MB:g} MB"
IDLE_KEYS = ("running", "prefilling", "queued")
FINISHED = ("stop", "length", "tool_calls")


# -- requests ------------------------------------------------------------------------------------


def load_prompts(path: Path = CONVERSATIONS) -> list[dict]:
    """The demo's canned conversations: messages, tools and the thinking switch of each."""
    records = json.loads(path.read_text())
    if isinstance(records, dict):
        records = records.get("conversations", list(records.values()))
    return [
        {
            "name": r["name"],
            "messages": r["messages"],
            "tools": r.get("tools"),
            "enable_thinking": r.get("enable_thinking", True),
        }
        for r in records
    ]


def chat_body(prompt: dict, seed: int, max_tokens: int, **extra) -> dict:
    body = {
        "model": "default",
        "messages": prompt["messages"],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": seed,
        **extra,
    }
    if prompt["tools"]:
        body["tools"] = prompt["tools"]
    if not prompt["enable_thinking"]:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return body


def poison_request(name: str, max_tokens: int, prompt: dict, seed: int) -> dict:
    """{json | content, headers} for one poison request (built before the round starts)."""
    hello = {"role": "user", "content": "Hello"}
    plain = chat_body({**prompt, "messages": [hello], "tools": None}, seed, max_tokens)
    if name == "frequency_penalty":
        return {"json": chat_body(prompt, seed, max_tokens, frequency_penalty=0.5)}
    if name == "top_k":
        return {"json": {**plain, "top_k": 2**63}}
    if name == "surrogate":
        body = {**plain, "messages": [{"role": "user", "content": f"x {SURROGATE_MARK} y"}]}
        raw = json.dumps(body).replace(SURROGATE_MARK, "\\ud800")  # the JSON text escapes it
        return {"content": raw.encode(), "headers": {"content-type": "application/json"}}
    if name == "template_kwargs":
        return {"json": {**plain, "chat_template_kwargs": {"messages": []}}}
    if name == "tool_schema":
        return {"json": {**plain, "tools": [BAD_TOOL]}}
    if name == "huge_prompt":
        text = "hello world " * (15 * 1024 * 1024 // 12)
        body = {**plain, "messages": [{"role": "user", "content": text}]}
        return {
            "content": json.dumps(body).encode(),
            "headers": {"content-type": "application/json"},
        }
    if name == "bad_host":
        return {"json": plain, "headers": {"Host": "evil.example"}}
    raise ValueError(f"unknown poison {name!r}")


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    *,
    json_body: dict | None = None,
    content: bytes | None = None,
    headers: dict | None = None,
    disconnect_after: int = 0,
    started: asyncio.Event | None = None,
) -> dict:
    """One streaming chat. Closes the response after `disconnect_after` chunks if that is > 0.
    Returns its record: status, outcome (completed / disconnected / error / refused), tokens..."""
    rec: dict = {"status": None, "chunks": 0, "tokens": None, "finish": None, "errors": []}
    done = False
    start = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, json=json_body, content=content, headers=headers
        ) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                try:
                    rec["error"] = json.loads(text)["error"]
                except (ValueError, KeyError, TypeError):
                    rec["error"] = {"message": text[:300]}
                rec["outcome"] = "refused"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["errors"].append(str(chunk["error"])[:300])
                    continue
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    rec["chunks"] += 1
                    delta = choice.get("delta") or {}
                    if "ttft" not in rec and any(
                        delta.get(k) for k in ("content", "reasoning_content", "tool_calls")
                    ):
                        rec["ttft"] = time.perf_counter() - start
                        if started is not None:
                            started.set()
                    rec["finish"] = choice.get("finish_reason") or rec["finish"]
                if disconnect_after and rec["chunks"] >= disconnect_after and not rec["finish"]:
                    rec["outcome"] = "disconnected"  # leaving the block closes the connection
                    return rec
    except (httpx.HTTPError, ValueError) as e:
        rec["errors"].append(f"{type(e).__name__}: {e}"[:300])
    finally:
        rec["latency"] = time.perf_counter() - start
    if not rec["errors"]:
        if not done:
            rec["errors"].append("the stream ended without [DONE]")
        elif rec["finish"] not in FINISHED:
            rec["errors"].append(f"finish_reason {rec['finish']!r}")
        elif rec["tokens"] is None:
            rec["errors"].append("no usage chunk")
    rec["outcome"] = "error" if rec["errors"] else "completed"
    return rec


# -- one round -----------------------------------------------------------------------------------


async def poll_health(client: httpx.AsyncClient, base: str, stop: asyncio.Event) -> float:
    """Poll /health every 0.2 s until `stop`; return the slowest round trip (informative)."""
    slowest = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        try:
            await client.get(base + "/health", timeout=30)
        except httpx.HTTPError:
            pass
        slowest = max(slowest, time.perf_counter() - t)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    return slowest


async def run_round_async(
    base: str,
    prompts: list[dict],
    poisons: list[str],
    poison_requests: dict[str, dict],
    streams: int,
    max_tokens: int,
) -> dict:
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = asyncio.Event()
        stop = asyncio.Event()
        health = asyncio.create_task(poll_health(client, base, stop))
        tasks, kinds = [], []
        t0 = time.perf_counter()
        for i in range(streams):
            prompt = prompts[i % len(prompts)]
            if i % 4 == 3:  # a quarter leave mid-stream
                body = chat_body(prompt, i, 8 * max_tokens, logit_bias=NO_END)
                after = 3 + (i // 4) % 3
            else:
                body, after = chat_body(prompt, i, max_tokens), 0
            kinds.append({"index": i, "prompt": prompt["name"], "disconnect_after": after})
            tasks.append(
                asyncio.create_task(
                    stream_chat(
                        client, url, json_body=body, disconnect_after=after, started=started
                    )
                )
            )
        try:  # the poison lands while the streams are generating
            await asyncio.wait_for(started.wait(), 60)
        except TimeoutError:
            pass
        in_flight = sum(not t.done() for t in tasks)
        poison_tasks = []
        for name in poisons:
            req = poison_requests[name]
            poison_tasks.append(
                asyncio.create_task(
                    stream_chat(
                        client,
                        url,
                        json_body=req.get("json"),
                        content=req.get("content"),
                        headers=req.get("headers"),
                    )
                )
            )
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        poison_results = await asyncio.gather(*poison_tasks)
        stop.set()
        health_max = await health
    records = [{**k, **r} for k, r in zip(kinds, results, strict=True)]
    for r in records:
        for key in ("latency", "ttft"):
            if key in r:
                r[key] = round(r[key], 4)
    ttfts = [r["ttft"] for r in records if "ttft" in r]
    tokens = sum(r["tokens"] or 0 for r in records if r["outcome"] == "completed")
    poison_records = []
    for name, r in zip(poisons, poison_results, strict=True):
        poison_records.append(
            {
                "name": name,
                "status": r["status"],
                "outcome": r["outcome"],
                "latency_s": round(r["latency"], 3),
                "error": r.get("error") or (r["errors"] or None),
            }
        )
    return {
        "streams": streams,
        "completed": sum(r["outcome"] == "completed" for r in records),
        "disconnected": sum(r["outcome"] == "disconnected" for r in records),
        "stream_errors": [
            {
                "index": r["index"],
                "prompt": r["prompt"],
                "status": r["status"],
                "errors": r["errors"],
            }
            for r in records
            if r["outcome"] not in ("completed", "disconnected")
        ],
        "poisons": poison_records,
        "streams_in_flight_at_poison": in_flight,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4) if ttfts else None,
        "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4) if ttfts else None,
        "slowest_health_s": round(health_max, 3),
        "requests": records,
    }


def wait_idle(server: ServerProcess, timeout: float) -> tuple[bool, float, dict]:
    """Poll /health until running, prefilling and queued are all 0."""
    t0 = time.perf_counter()
    stats: dict = {}
    while True:
        try:
            stats = server.health()
        except httpx.HTTPError as e:
            stats = {"error": str(e)}
        if all(stats.get(k) == 0 for k in IDLE_KEYS):
            return True, time.perf_counter() - t0, stats
        if time.perf_counter() - t0 > timeout or server.proc.poll() is not None:
            return False, time.perf_counter() - t0, stats
        time.sleep(0.1)


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB, from /proc (no psutil)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def run_load(
    server: ServerProcess,
    *,
    rounds: int,
    streams: int,
    max_tokens: int,
    poisons_per_round: int = 1,
    poisons: list[str] | None = None,
    idle_timeout: float = 10.0,
    log=print,
) -> list[dict]:
    prompts = load_prompts()
    names = list(poisons or EXPECTED)
    schedule = [
        [names[(r * poisons_per_round + j) % len(names)] for j in range(poisons_per_round)]
        for r in range(rounds)
    ]
    requests = {
        name: poison_request(name, max_tokens, prompts[k % len(prompts)], 1000 + k)
        for k, name in enumerate(names)
        if any(name in s for s in schedule)
    }
    out = []
    for r, poisons in enumerate(schedule, 1):
        before = server.health()
        result = asyncio.run(
            run_round_async(server.base, prompts, poisons, requests, streams, max_tokens)
        )
        idle, idle_s, after = wait_idle(server, idle_timeout)
        mem = rss_mb(server.proc.pid)
        result = {
            "round": r,
            **result,
            "idle": idle,
            "idle_after_s": round(idle_s, 3),
            "health_after": after,
            "engine_failed": after.get("failed", 0) - before.get("failed", 0),
            "engine_cancelled": after.get("cancelled", 0) - before.get("cancelled", 0),
            "rss_mb": mem.get("VmRSS"),
            "peak_rss_mb": mem.get("VmHWM"),
        }
        out.append(result)
        log(format_row(result))
    return out


def warm_up(server: ServerProcess, streams: int, max_tokens: int) -> dict:
    """One round of the same streams (disconnects included) without a poison, not measured:
    compiles, fills caches and the allocator's arenas, so that round 1 is a fair RSS baseline."""
    result = asyncio.run(run_round_async(server.base, load_prompts(), [], {}, streams, max_tokens))
    idle, idle_s, after = wait_idle(server, 30)
    return {
        "completed": result["completed"],
        "disconnected": result["disconnected"],
        "stream_errors": result["stream_errors"],
        "wall_s": result["wall_s"],
        "idle": idle,
        "rss_mb": rss_mb(server.proc.pid).get("VmRSS"),
    }


# -- verdict, table, plot ------------------------------------------------------------------------


def evaluate(
    record: dict,
    expected: dict[str, int] = EXPECTED,
    rss_factor: float = RSS_FACTOR,
    rss_slack_mb: float = RSS_SLACK_MB,
) -> list[str]:
    """The failures of a run (an empty list: it passed). Works on the JSON record alone."""
    failures = []
    rounds = record["rounds"]
    warm = record.get("warmup") or {}
    if warm.get("stream_errors"):
        failures.append(
            f"warm-up round: {len(warm['stream_errors'])} streams failed:"
            f" {warm['stream_errors'][0]}"
        )
    if not rounds:
        return ["no rounds were run"]
    for rnd in rounds:
        n = rnd["round"]
        for p in rnd["poisons"]:
            want = expected[p["name"]]
            if p["status"] != want:
                failures.append(
                    f"round {n}: poison {p['name']} got HTTP {p['status']}, expected {want}"
                    f" ({p['error']})"
                )
            elif want == 200 and p["outcome"] != "completed":
                failures.append(
                    f"round {n}: {p['name']} (must succeed) did not complete: {p['error']}"
                )
        if rnd["stream_errors"]:
            first = rnd["stream_errors"][0]
            failures.append(
                f"round {n}: {len(rnd['stream_errors'])} non-poison streams failed, e.g. #"
                f"{first['index']} ({first['prompt']}): HTTP {first['status']} {first['errors']}"
            )
        if rnd["completed"] + rnd["disconnected"] != rnd["streams"]:
            failures.append(
                f"round {n}: {rnd['completed']} completed + {rnd['disconnected']} disconnected"
                f" of {rnd['streams']} streams"
            )
        if rnd["engine_failed"]:
            failures.append(f"round {n}: the engine failed {rnd['engine_failed']} requests")
        if rnd["engine_cancelled"] < rnd["disconnected"]:
            failures.append(
                f"round {n}: {rnd['disconnected']} clients left mid-stream but the engine"
                f" cancelled {rnd['engine_cancelled']} requests"
            )
        if not rnd["idle"]:
            failures.append(
                f"round {n}: not back to idle {rnd['idle_after_s']} s after the round:"
                f" {rnd['health_after']}"
            )
    first, final = rounds[0]["rss_mb"], rounds[-1]["rss_mb"]
    limit = first * rss_factor + rss_slack_mb
    if final > limit:
        failures.append(
            f"RSS grew: {final} MB after round {len(rounds)} > {limit:.1f} MB"
            f" (round 1: {first} MB x {rss_factor} + {rss_slack_mb:g} MB)"
        )
    if not record.get("server_alive", True):
        failures.append(f"the server is down at the end: {record.get('server_health')}")
    return failures


COLUMNS = (
    f"{'round':>5} {'poison':<18} {'status':>10} {'done':>5} {'disc':>5} {'err':>4} "
    f"{'tok/s':>7} {'ttft p50':>9} {'ttft p99':>9} {'idle s':>7} {'RSS MB':>7}"
)


def seconds(value: float | None) -> str:
    return f"{value:>9.3f}" if value is not None else f"{'-':>9}"


def format_row(rnd: dict) -> str:
    lines = []
    for j, p in enumerate(rnd["poisons"]):
        want = EXPECTED[p["name"]]
        status = f"{p['status']}/{want}"
        if j == 0:
            lines.append(
                f"{rnd['round']:>5} {p['name']:<18} {status:>10} {rnd['completed']:>5} "
                f"{rnd['disconnected']:>5} {len(rnd['stream_errors']):>4} "
                f"{rnd['tokens_per_s']:>7.1f} {seconds(rnd['ttft_p50_s'])} {seconds(rnd['ttft_p99_s'])} "
                f"{rnd['idle_after_s'] if rnd['idle'] else 'NO':>7} {rnd['rss_mb']:>7.1f}"
            )
        else:
            lines.append(f"{'':>5} {p['name']:<18} {status:>10}")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in record["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(rounds, [r["rss_mb"] for r in record["rounds"]], "o-", color="C0", label="RSS")
    first = record["rounds"][0]["rss_mb"]
    ax.axhline(
        first * RSS_FACTOR + RSS_SLACK_MB, color="C0", linestyle=":", label="RSS limit (final)"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("server RSS after the round (MB)", color="C0")
    ax.set_ylim(
        0, max(first * RSS_FACTOR + RSS_SLACK_MB, *[r["rss_mb"] for r in record["rounds"]]) * 1.1
    )
    ax.set_xticks(rounds)
    ax2 = ax.twinx()
    ax2.plot(
        rounds, [r["tokens_per_s"] for r in record["rounds"]], "s--", color="C1", label="tok/s"
    )
    ax2.set_ylabel("aggregate output tok/s", color="C1")
    ax2.set_ylim(0, max(r["tokens_per_s"] for r in record["rounds"]) * 1.25 + 1)
    s = record["settings"]
    verdict = "PASS" if record["verdict"]["passed"] else "FAIL"
    ax.set_title(
        f"serve_load {record['model']['id']}: {s['streams']} streams/round, "
        f"{s['max_tokens']} tokens — {verdict}",
        fontsize=9,
    )
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def backend() -> str:
    """MLX's device here (the server's, as it runs on this machine): cpu, cuda or metal."""
    try:
        import mlx.core as mx

        gpu = mx.default_device() == mx.gpu
    except Exception:
        gpu = False
    if gpu:
        return "metal" if sys.platform == "darwin" else "cuda"
    return "cpu"


def machine_tag() -> str:
    """For file names: the GPU backend, or the CPU count (2cpu) on the CPU backend."""
    kind = backend()
    return f"{os.cpu_count()}cpu" if kind == "cpu" else kind


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.split("/")[-1]).strip("-").lower() or "model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model directory or hub id (default: the demo model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=32, help="concurrent streams a round")
    p.add_argument("--max-tokens", type=int, default=64, help="of each completing stream")
    p.add_argument("--poisons-per-round", type=int, default=1)
    p.add_argument(
        "--poisons",
        type=lambda text: text.split(","),
        default=list(EXPECTED),
        help=f"comma-separated kinds to rotate over (default: all, {','.join(EXPECTED)})",
    )
    p.add_argument("--idle-timeout", type=float, default=10.0, help="seconds to get back to idle")
    p.add_argument("--out", type=Path, help="output stem (STEM.json, STEM.png)")
    args = p.parse_args(argv)
    if min(args.rounds, args.streams, args.max_tokens, args.poisons_per_round) < 1:
        p.error("--rounds, --streams, --max-tokens and --poisons-per-round must be >= 1")
    if unknown := set(args.poisons) - set(EXPECTED):
        p.error(f"unknown --poisons {sorted(unknown)}; the kinds: {', '.join(EXPECTED)}")
    argv = list(sys.argv[1:] if argv is None else argv)

    server_args = ["--max-body-mb", "32"]
    if args.model:
        server_args += ["--model", args.model]
    started = time.perf_counter()
    server = ServerProcess(server_args)
    try:
        model = httpx.get(server.base + "/api/v0/models", timeout=30).json()["data"][0]
        print(
            f"server pid {server.proc.pid} up in {time.perf_counter() - started:.1f} s, {model['id']}"
        )
        warm = warm_up(server, args.streams, args.max_tokens)
        print(
            f"warm-up round (no poison, not measured): {warm['completed']} completed,"
            f" {warm['disconnected']} disconnected, {len(warm['stream_errors'])} errors,"
            f" RSS {warm['rss_mb']} MB\n{COLUMNS}"
        )
        rounds = run_load(
            server,
            rounds=args.rounds,
            streams=args.streams,
            max_tokens=args.max_tokens,
            poisons_per_round=args.poisons_per_round,
            poisons=args.poisons,
            idle_timeout=args.idle_timeout,
        )
        alive = server.proc.poll() is None
        try:
            final_health = server.health()
        except httpx.HTTPError as e:
            final_health, alive = {"error": str(e)}, False
        alive = alive and final_health.get("status") == "ok"
    finally:
        server.stop()

    stem = args.out or ROOT / "benchmarks" / "results" / (
        f"serve_load_{slug(model['id'])}_{machine_tag()}_{time.strftime('%Y%m%d')}"
    )
    record = {
        "benchmark": "serve_load",
        "command": " ".join(["python -m benchmarks.serve_load", *argv]).strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {k: model.get(k) for k in ("id", "arch", "quantization", "max_context_length")},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "backend": backend(),
            "python": platform.python_version(),
        },
        "server_args": server_args,
        "settings": {
            "rounds": args.rounds,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "disconnecting": "every 4th stream, after 3-5 chunks, asking 8 x max_tokens"
            " with end-of-turn suppressed",
            "poisons_per_round": args.poisons_per_round,
            "poisons": args.poisons,
            "idle_timeout_s": args.idle_timeout,
        },
        "criteria": {
            "poison_expected_status": EXPECTED,
            "non_poison_stream_errors": 0,
            "engine_failed": 0,
            "engine_cancelled": ">= disconnected streams (each client that left was cancelled)",
            "idle": f"running, prefilling, queued all 0 within {args.idle_timeout:g} s",
            "rss": RSS_RULE,
        },
        "warmup": warm,
        "server_alive": alive,
        "server_health": final_health,
        "rounds": rounds,
    }
    failures = evaluate(record)
    record["verdict"] = {"passed": not failures, "failures": failures}
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.parent / (stem.name + ".json")
    json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    plot(record, stem.parent / (stem.name + ".png"))
    print(f"RSS: {' -> '.join(str(r['rss_mb']) for r in rounds)} MB ({RSS_RULE})")
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
    else:
        print("PASS: only the poison requests failed; all else completed or left on purpose")
    print(f"-> {json_path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The server's engine in-process: batched decode equals one-at-a-time, prefix reuse, cancellation.

Uses the tiny random Qwen3 from conftest (real tokenizer, greedy decoding), no HTTP.
"""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from qwen3_mlx.cache import make_cache
from qwen3_mlx.generation import Sequence, forward
from qwen3_mlx.sampling import SamplingParams
from qwen3_mlx.server.engine import (
    Batch,
    Channel,
    Engine,
    EngineBusy,
    Failed,
    Finished,
    GenerationRequest,
    Output,
    Row,
)
from qwen3_mlx.server.models import load_served_model


@pytest.fixture(scope="module")
def served(tiny_qwen3_dir):
    return load_served_model(str(tiny_qwen3_dir))


def single_logits(
    model, prompt: list[int], continuation: list[int], kv_bits=None, max_kv_size=None
) -> list[mx.array]:
    """Logits after the prompt, then after each continuation token, with a KV cache of its own
    (plain, quantized to `kv_bits`, or mlx-lm's rotating cache of `max_kv_size`)."""
    cache = make_cache(model, kv_bits, 32, max_kv_size)  # the tiny model's head_dim is 32
    out = [forward(model, mx.array([prompt]), cache)[0]]
    for token in continuation:
        out.append(forward(model, mx.array([[token]]), cache)[0])
    return out


def make_request(served, prompt, max_tokens=8, seed=None, **params) -> GenerationRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed, **params).resolve(
        thinking=False
    )
    seq = Sequence(served.tokenizer, prompt, params, prompt_state="answer", parse_tools=False)
    return GenerationRequest(served, seq, Channel(asyncio.get_running_loop()))


def test_batched_logits_equal_single_sequence_logits(served):
    """Rows joining mid-flight and leaving early see exactly the logits they would alone."""
    model = served.model
    prompts = {"a": [11, 22, 33, 44, 55], "b": [7, 8, 9, 10, 11, 12, 13, 14, 15], "c": [99, 98, 97]}
    follow = {"a": [1, 2, 3, 4, 5], "b": [6, 7, 8, 9, 10], "c": [11, 12, 13]}
    expected = {k: single_logits(model, prompts[k], follow[k]) for k in prompts}

    batch = Batch(served)

    def join(name):
        request = type(
            "R", (), {"prompt": prompts[name], "sequence": None, "params": SamplingParams()}
        )
        row = Row.__new__(Row)
        row.cache = [KVCache() for _ in model.layers]
        forward(model, mx.array([prompts[name][:-1]]), row.cache)
        row.request, row.name, row.step, row.next_input = request, name, 0, prompts[name][-1]
        batch.add(row)

    def step():
        logits = batch.forward(mx.array([r.next_input for r in batch.rows]))
        for i, row in enumerate(batch.rows):
            diff = mx.abs(logits[i] - expected[row.name][row.step]).max().item()
            assert diff < 1e-4, f"row {row.name} step {row.step}: max |diff| {diff}"
            row.next_input = follow[row.name][row.step] if row.step < len(follow[row.name]) else 0
            row.step += 1

    join("a")
    join("b")
    step()
    step()
    join("c")  # joins a batch that has decoded two steps
    step()
    batch.keep([i for i, r in enumerate(batch.rows) if r.name != "a"])  # a leaves early
    step()
    step()
    assert [r.name for r in batch.rows] == ["b", "c"]


async def run(engine: Engine, request: GenerationRequest) -> tuple[list[int], Finished]:
    engine.submit(request)
    tokens = []
    while True:
        event = await asyncio.wait_for(request.channel.get(), 60)
        if isinstance(event, Output):
            tokens.append(event.step.token)
        else:
            assert isinstance(event, Finished), event
            return request.sequence.tokens, event


def test_concurrent_requests_decode_like_single_ones(served):
    asyncio.run(_test_concurrent_requests_decode_like_single_ones(served))


async def _test_concurrent_requests_decode_like_single_ones(served):
    prompts = [
        served.tokenizer.encode(t)
        for t in ("Hello there", "The weather in Paris is", "1 2 3 4 5 6 7")
    ]
    lengths = [12, 5, 9]
    alone = Engine([served], max_concurrency=1)
    alone.start()
    try:
        expected = [
            await run(alone, make_request(served, p, n))
            for p, n in zip(prompts, lengths, strict=True)
        ]
    finally:
        alone.close()
    together = Engine([served], max_concurrency=8)
    together.start()
    try:
        results = await asyncio.gather(
            *(
                run(together, make_request(served, p, n))
                for p, n in zip(prompts, lengths, strict=True)
            )
        )
        assert together.steps < sum(lengths)  # the rows shared decode steps
    finally:
        together.close()
    for (tokens, finished), (want, _) in zip(results, expected, strict=True):
        assert tokens == want
        assert finished.finish_reason == "length"
        assert finished.completion_tokens == len(want)


def test_prefix_cache_reuse_reports_cached_tokens_and_changes_nothing(served):
    asyncio.run(_test_prefix_cache_reuse_reports_cached_tokens_and_changes_nothing(served))


async def _test_prefix_cache_reuse_reports_cached_tokens_and_changes_nothing(served):
    engine = Engine([served])
    engine.start()
    try:
        base = served.tokenizer.encode("A long shared system prompt about many things. " * 4)
        first, f1 = await run(engine, make_request(served, base + [100, 101], 6))
        assert f1.cached_tokens == 0
        second, f2 = await run(engine, make_request(served, base + [100, 101], 6))
        assert f2.cached_tokens == len(base) + 1  # all but the last prompt token
        assert second == first
        third, f3 = await run(engine, make_request(served, base + [200], 6))
        assert f3.cached_tokens == len(base)
    finally:
        engine.close()
    fresh = Engine([served])
    fresh.start()
    try:
        want, _ = await run(fresh, make_request(served, base + [200], 6))
    finally:
        fresh.close()
    assert third == want


def test_cancel_frees_the_slot_and_queue_is_bounded(served):
    asyncio.run(_test_cancel_frees_the_slot_and_queue_is_bounded(served))


async def _test_cancel_frees_the_slot_and_queue_is_bounded(served):
    engine = Engine([served], max_concurrency=1, max_queue=1)
    engine.start()
    try:
        long = make_request(served, served.tokenizer.encode("count"), 100_000)
        engine.submit(long)
        first = await asyncio.wait_for(long.channel.get(), 30)
        assert isinstance(first, Output)
        waiting = make_request(served, served.tokenizer.encode("next"), 3)
        engine.submit(waiting)  # waits: the only slot is taken
        with pytest.raises(EngineBusy, match="--max-queue"):
            engine.submit(make_request(served, [1, 2], 3))
        long.cancel()
        engine.wake()
        while not isinstance(event := await asyncio.wait_for(long.channel.get(), 30), Finished):
            pass
        assert event.finish_reason == "abort"
        tokens, finished = await asyncio.wait_for(_drain(waiting), 30)
        assert finished.finish_reason == "length" and len(tokens) == 3
        for _ in range(100):  # the Finished event may overtake the batch bookkeeping by a hair
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert (stats["running"], stats["prefilling"], stats["queued"], stats["cancelled"]) == (
            0,
            0,
            0,
            1,
        )
    finally:
        engine.close()


async def _drain(request):
    while True:
        event = await request.channel.get()
        if isinstance(event, Finished):
            return request.sequence.tokens, event


class _FailingPenalties:
    """Penalty state made lazily on another thread, as the server's HTTP side once made it: the
    engine thread can't evaluate it, so any step graph that includes it fails."""

    def __init__(self):
        made = []
        thread = threading.Thread(target=lambda: made.append(mx.zeros((1,)) + 1))
        thread.start()
        thread.join()
        self.offset = made[0]

    def __call__(self, logits):
        return logits + self.offset

    def observe(self, token):
        pass


class _PoisonedSequence(Sequence):
    @property
    def penalties(self):
        if not hasattr(self, "_poison"):
            self._poison = _FailingPenalties()
        return self._poison


def test_a_failing_row_fails_alone_and_the_batch_goes_on(served):
    asyncio.run(_test_a_failing_row_fails_alone_and_the_batch_goes_on(served))


async def _test_a_failing_row_fails_alone_and_the_batch_goes_on(served):
    prompts = [served.tokenizer.encode(t) for t in ("Hello there", "The weather in Paris is")]
    alone = Engine([served], max_concurrency=1)
    alone.start()
    try:
        expected = [await run(alone, make_request(served, p, 10)) for p in prompts]
    finally:
        alone.close()
    engine = Engine([served], max_concurrency=8)
    engine.start()
    try:
        good = [make_request(served, p, 10) for p in prompts]
        bad = make_request(served, served.tokenizer.encode("poison"), 10, repetition_penalty=1.1)
        bad.sequence.__class__ = _PoisonedSequence
        for request in (good[0], bad, good[1]):
            engine.submit(request)
        events = []
        while not isinstance(event := await asyncio.wait_for(bad.channel.get(), 30), Failed):
            events.append(event)
        assert "internal error (sampling)" in event.message
        results = [await asyncio.wait_for(_drain(r), 30) for r in good]
        assert engine.alive and engine.stats()["failed"] == 1
        for (tokens, finished), (want, _) in zip(results, expected, strict=True):
            assert tokens == want and finished.finish_reason == "length"
        again, _ = await run(engine, make_request(served, prompts[0], 10))
        assert again == expected[0][0]
    finally:
        engine.close()


def test_health_says_failing_while_every_request_fails(served):
    """/health is not "ok" while the engine fails every request, and is again once one succeeds:
    the app over a real engine (in process: the failure is injected as in the test above)."""
    from starlette.testclient import TestClient

    from qwen3_mlx.server.app import Settings, create_app
    from qwen3_mlx.server.models import ModelRegistry

    engine = Engine([served], max_concurrency=4)
    with TestClient(create_app(ModelRegistry([served]), engine, Settings())) as client:
        assert client.get("/health").json()["status"] == "ok"

        async def poison_three():
            for _ in range(Engine.FAILING_AFTER):
                bad = make_request(served, [1, 2, 3], 4, repetition_penalty=1.1)
                bad.sequence.__class__ = _PoisonedSequence
                engine.submit(bad)
                while not isinstance(await asyncio.wait_for(bad.channel.get(), 30), Failed):
                    pass

        asyncio.run(poison_three())
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert "sampling" in health.json()["last_error"]
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert client.get("/health").json()["status"] == "ok"


def test_rows_with_one_prompt_prefill_it_once(served):
    asyncio.run(_test_rows_with_one_prompt_prefill_it_once(served))


async def _test_rows_with_one_prompt_prefill_it_once(served):
    """`n` choices (or many clients with one long system prompt) arrive together: the first
    prefills, the others wait for its prefix and start from it."""
    prompt = served.tokenizer.encode("A long shared prompt about many things. " * 6)
    engine = Engine([served], max_concurrency=8, prefill_step=16)
    engine.start()
    try:
        requests = [make_request(served, prompt, 6) for _ in range(3)]
        for request in requests:
            engine.submit(request)
        results = [await asyncio.wait_for(_drain(r), 60) for r in requests]
    finally:
        engine.close()
    cached = sorted(finished.cached_tokens for _, finished in results)
    assert cached == [0, len(prompt) - 1, len(prompt) - 1]
    assert results[0][0] == results[1][0] == results[2][0]  # greedy: the same reply


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_slots_keep_every_row_exact_through_joins_leaves_growth_and_buckets(
    served, monkeypatch, kv_bits
):
    """Rows of many lengths join and leave a batch whose KV columns grow and are compacted
    (STEP shrunk to 8 so it happens at test sizes) and whose bucket grows and shrinks: each row
    still sees the logits it would alone, free slots included; with --kv-bits 8 as well. The
    capacity only ever takes doubling sizes."""
    from qwen3_mlx.server import slots as slot_module

    monkeypatch.setattr(slot_module, "STEP", 8)
    model = served.model
    rng = __import__("random").Random(5)
    batch = Batch(served)
    live, sizes, capacities = {}, set(), set()

    def join(name, length):
        prompt = [rng.randrange(1, 500) for _ in range(length)]
        follow = [rng.randrange(1, 500) for _ in range(12)]
        expected = single_logits(model, prompt, follow, kv_bits)
        row = Row.__new__(Row)
        row.cache = make_cache(model, kv_bits, 32)
        forward(model, mx.array([prompt[:-1]]), row.cache)
        row.next_input, row.step = prompt[-1], 0
        live[name] = (row, follow, expected)
        batch.add(row)

    def step():
        logits = batch.forward(mx.array([r.next_input for r in batch.rows]))
        if batch.slots is not None:
            sizes.add(batch.slots.size)
            capacities.add(batch.slots.capacity)
        for i, row in enumerate(batch.rows):
            name = next(n for n, v in live.items() if v[0] is row)
            _, follow, expected = live[name]
            diff = mx.abs(logits[i] - expected[row.step]).max().item()
            assert diff < 1e-4, f"row {name} step {row.step}: max |diff| {diff}"
            row.next_input = follow[row.step]
            row.step += 1

    def leave(*names):
        gone = {id(live.pop(n)[0]) for n in names}
        batch.keep([i for i, r in enumerate(batch.rows) if id(r) not in gone])

    join("long", 40)
    join("a", 3)
    step()
    for name, length in (("b", 9), ("c", 2), ("d", 17), ("e", 5)):
        join(name, length)  # a 2-slot bucket grows to 4, then 8
        step()
    join("f", 60)  # longer than every row so far: all rows shift right
    step()
    end = batch.slots.end
    leave("long", "f", "d")  # the long rows leave: the unused columns are dropped
    assert batch.slots.end < end
    step()
    leave("b", "c")  # 2 rows in 4 slots: a smaller bucket
    step()
    step()
    leave("e")  # one row left: plain caches again
    step()
    assert batch.slots is None and len(batch.rows) == 1
    assert isinstance(batch.cache[0], QuantizedKVCache if kv_bits else KVCache)
    assert {2, 4, 8} <= sizes
    # Growth doubles, and shifts and drops keep the capacity: a few sizes of K/V arrays, each
    # met once (slots.GROW_MAX says why).
    assert all(c // 8 & (c // 8 - 1) == 0 for c in capacities), capacities
    assert max(capacities) >= 64  # grown from 8 (a 40- and a 60-token row joined)


def test_windowed_slots_match_a_rotating_cache(served, monkeypatch):
    """--max-kv-size: rows decoding far past the window (and a row joining them) see exactly the
    logits of the Python API's rotating cache; the masked columns are dropped as they pile up."""
    import dataclasses

    from qwen3_mlx.server import slots as slot_module

    monkeypatch.setattr(slot_module, "STEP", 8)
    window = 24
    windowed = dataclasses.replace(served, max_kv_size=window)
    model = served.model
    rng = __import__("random").Random(7)
    batch = Batch(windowed)
    live = {}

    def join(length, steps):
        prompt = [rng.randrange(1, 500) for _ in range(length)]
        follow = [rng.randrange(1, 500) for _ in range(steps)]
        expected = single_logits(model, prompt, follow, max_kv_size=window)
        row = Row.__new__(Row)
        row.cache = make_cache(model)
        forward(model, mx.array([prompt[:-1]]), row.cache)
        row.next_input, row.step = prompt[-1], 0
        live[id(row)] = (follow, expected)
        batch.add(row)

    def step():
        logits = batch.forward(mx.array([r.next_input for r in batch.rows]))
        for i, row in enumerate(batch.rows):
            follow, expected = live[id(row)]
            diff = mx.abs(logits[i] - expected[row.step]).max().item()
            assert diff < 1e-4, f"row {i} step {row.step}: max |diff| {diff}"
            row.next_input = follow[row.step]
            row.step += 1

    join(20, 70)  # alone: already in a (one-slot) window
    assert batch.slots is not None and batch.slots.size == 1
    for _ in range(30):
        step()
    join(6, 35)
    for _ in range(34):
        step()
    slot = batch.rows[0].slot
    assert batch.slots.dropped[slot] > 0  # compacted, not only masked
    assert batch.slots.end - batch.slots.pads[slot] <= window + 8
    assert batch.extract(0, 10) is None  # past its window: no prefix store entry


def test_prefill_share_grows_while_more_prompts_wait_than_rows_decode():
    """One newcomer beside 7 running streams gets the usual quarter of the engine's time; 7
    clients arriving while one stream runs get most of it (their first tokens are waiting)."""
    from qwen3_mlx.server.prefill import PREFILL_SHARE, decode_per_prefill

    usual = (1 - PREFILL_SHARE) / PREFILL_SHARE
    assert decode_per_prefill(1, 7) == pytest.approx(usual)
    assert decode_per_prefill(2, 2) == pytest.approx(1.0)  # half each
    assert decode_per_prefill(7, 1) == pytest.approx(0.25)  # capped at BURST_SHARE 0.8
    assert decode_per_prefill(30, 2) == pytest.approx(0.25)

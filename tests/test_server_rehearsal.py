"""The engine's start-up rehearsal (server/rehearsal.py): made-up requests through its own
prefill, joins and batched decode, growing through every bucket up to --max-concurrency, and
nothing of it left behind: the same replies as an engine without it, counters and metrics
untouched, the prefix store empty."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from qwen3_mlx.server.engine import Engine
from qwen3_mlx.server.models import load_served_model
from tests.test_server_engine import make_request, run


@pytest.fixture(scope="module")
def served(tiny_qwen3_dir):
    return load_served_model(str(tiny_qwen3_dir))


def test_rehearsal_meets_every_bucket_and_leaves_nothing_behind(served, caplog):
    asyncio.run(_rehearsal(served, caplog))


async def _replies(engine: Engine, served) -> list[list[int]]:
    prompts = [served.tokenizer.encode(t) for t in ("Hello there", "1 2 3 4 5 6 7", "Paris is")]
    results = await asyncio.gather(
        *(run(engine, make_request(served, p, n)) for p, n in zip(prompts, (9, 6, 7), strict=True))
    )
    return [tokens for tokens, _ in results]


async def _rehearsal(served, caplog):
    finished = []
    plain = Engine([served], max_concurrency=8, rehearse=False)
    plain.start()
    try:
        expected = await _replies(plain, served)
    finally:
        plain.close()

    engine = Engine([served], max_concurrency=8, rehearse=True)
    engine.on_finished = lambda model, event: finished.append(event)
    with caplog.at_level(logging.INFO, logger="qwen3_mlx.server"):
        engine.start()
        await asyncio.to_thread(engine.ready.wait, 120)
    try:
        line = next(r.getMessage() for r in caplog.records if "rehearsal of" in r.getMessage())
        widest = int(re.search(r"up to (\d+) decoding together", line).group(1))
        assert widest == 8, line  # the batch grew to --max-concurrency: every bucket met
        assert "failed" not in caplog.text
        assert engine.steps == 0 and engine.failed == 0 and finished == []
        assert engine._prefixes[served.id].entries == []
        assert not engine._prefilling and not engine._batches[served.id].rows
        assert await _replies(engine, served) == expected
        assert len(finished) == 3  # real requests are counted as before
    finally:
        engine.close()

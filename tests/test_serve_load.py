"""The server load test (benchmarks/serve_load.py) on a small load, in this process: a real server,
2 rounds x 12 concurrent streams (3 of them leaving mid-stream), 4 poison requests a round so
that all 7 kinds are sent (the 15 MB prompt twice). Asserts the pass criteria, not speed, and prints the figures.

Then the same record is judged against deliberately wrong expectations and doctored figures, each
of which must be reported as a failure: the verdict can fail.
"""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks import serve_load

# The 15 MB prompt goes first, so round 1 (the RSS baseline) has already met it once; it is
# sent again at the end of round 2 (4 a round over 7 kinds), where a repeat must not grow RSS.
POISONS = ["huge_prompt", *(name for name in serve_load.EXPECTED if name != "huge_prompt")]
ARGS = [
    *("--rounds", "2", "--streams", "12", "--max-tokens", "24"),
    *("--poisons-per-round", "4", "--poisons", ",".join(POISONS)),
]


@pytest.fixture(scope="module")
def record(demo_model_dir, tmp_path_factory):
    stem = tmp_path_factory.mktemp("serve_load") / "serve_load_ci"
    code = serve_load.main([*ARGS, "--model", str(demo_model_dir), "--out", str(stem)])
    record = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    assert code == (0 if record["verdict"]["passed"] else 1)
    return record


@pytest.mark.timeout(240)
def test_only_the_poison_requests_fail_and_the_server_stays_flat(record):
    assert record["command"].startswith("python -m benchmarks.serve_load --rounds 2")
    assert record["verdict"] == {"passed": True, "failures": []}, record["verdict"]
    rounds = record["rounds"]
    assert len(rounds) == 2
    sent = {p["name"]: p["status"] for r in rounds for p in r["poisons"]}
    assert sent == serve_load.EXPECTED  # every kind sent, each got its status
    for r in rounds:
        assert r["completed"] == 9 and r["disconnected"] == 3 and r["stream_errors"] == []
        assert r["streams_in_flight_at_poison"] > 0  # the poison landed amid the streams
        assert r["idle"] and r["engine_failed"] == 0 and r["engine_cancelled"] >= 3
        assert r["output_tokens"] > 0 and r["ttft_p50_s"] is not None
    first, final = rounds[0]["rss_mb"], rounds[-1]["rss_mb"]
    assert final <= first * serve_load.RSS_FACTOR + serve_load.RSS_SLACK_MB
    assert record["server_alive"]
    print()
    print(serve_load.COLUMNS)
    for r in rounds:
        print(serve_load.format_row(r))


def doctored(record, change) -> list[str]:
    copied = copy.deepcopy(record)
    change(copied)
    return serve_load.evaluate(copied)


def test_a_wrong_expectation_or_a_bad_figure_fails_the_run(record):
    """The criteria are live: each deliberate mismatch is reported (the real run passed)."""
    assert serve_load.evaluate(record) == []
    # A poison expected to succeed, and the formerly-poison request expected to be refused.
    wrong = serve_load.evaluate(record, {**serve_load.EXPECTED, "top_k": 200})
    assert wrong and all("poison top_k got HTTP 400, expected 200" in f for f in wrong), wrong
    wrong = serve_load.evaluate(record, {**serve_load.EXPECTED, "frequency_penalty": 400})
    assert wrong and "poison frequency_penalty got HTTP 200, expected 400" in wrong[0], wrong

    def poison_broke_a_stream(r):
        r["rounds"][1]["completed"] -= 1
        r["rounds"][1]["stream_errors"] = [
            {"index": 0, "prompt": "hello", "status": 200, "errors": ["engine step failed"]}
        ]

    def freq_penalty_cut_short(r):
        p = next(p for p in r["rounds"][0]["poisons"] if p["name"] == "frequency_penalty")
        p["outcome"], p["error"] = "error", ["the stream ended without [DONE]"]

    def rss_grew(r):
        r["rounds"][-1]["rss_mb"] = r["rounds"][0]["rss_mb"] * 1.2 + 60

    def stuck(r):
        r["rounds"][0]["idle"] = False
        r["rounds"][0]["health_after"] = {"running": 3, "prefilling": 0, "queued": 0}

    def engine_failed(r):
        r["rounds"][0]["engine_failed"] = 12

    def not_cancelled(r):
        r["rounds"][1]["engine_cancelled"] = 0

    def died(r):
        r["server_alive"] = False

    for change, says in [
        (poison_broke_a_stream, "round 2: 1 non-poison streams failed"),
        (freq_penalty_cut_short, "round 1: frequency_penalty (must succeed) did not complete"),
        (rss_grew, "RSS grew"),
        (stuck, "round 1: not back to idle"),
        (engine_failed, "round 1: the engine failed 12 requests"),
        (not_cancelled, "round 2: 3 clients left mid-stream but the engine cancelled 0"),
        (died, "the server is down"),
    ]:
        failures = doctored(record, change)
        assert any(says in f for f in failures), (change.__name__, failures)

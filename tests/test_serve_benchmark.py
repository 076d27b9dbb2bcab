"""`python -m benchmarks.serve` end to end on the demo model: a small concurrent run with a mix of
prompt lengths (no poison) completes against a real server process, and its figures are printed.
Speed is reported, never asserted (the numbers belong in benchmarks/results/)."""

from __future__ import annotations

import json

from benchmarks import serve


def test_a_small_concurrent_run_completes_and_reports(tmp_path, demo_model_dir, capsys):
    stem = tmp_path / "serve_demo"
    code = serve.main(
        [
            "--model", str(demo_model_dir), "--streams", "1,4", "--prompt", "16,600",
            "--max-tokens", "12", "--rounds", "2", "--impl", "ours,stream_generate",
            "--workdir", str(tmp_path), "--out", str(stem),
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads(stem.with_suffix(".json").read_text())
    rows = record["rows"]
    assert {(r["streams"], r["prompt"], r["round"]) for r in rows} == {
        (n, p, r) for n in (1, 4) for p in (16, 600) for r in (1, 2)
    }
    for row in rows:
        assert row["aggregate_tok_s"] > 0 and row["ttft_max_s"] > 0
    assert {c["prompt"] for c in record["ceiling"]} == {16, 600}
    assert stem.with_suffix(".png").stat().st_size > 0
    summary = record["summary"]
    assert "vs_stream_generate" in summary["ours/p16/s1"]
    with capsys.disabled():
        print("\n" + json.dumps(summary, indent=1))

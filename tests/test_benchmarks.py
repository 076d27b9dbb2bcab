"""The side-by-side decode benchmark end to end on the tiny preset: both projects on the same
weights, the JSON record (command, versions, per-run timings, ratios) and the plot on disk."""

import json

from benchmarks import decode


def test_decode_benchmark_writes_a_record_and_a_plot(tmp_path):
    out = tmp_path / "decode_tiny"
    command = "--preset tiny --prompt 16 --batch 1,2 --gen 4 --repeats 1 --out"
    decode.main([*command.split(), str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert record["meta"]["command"].startswith("python -m benchmarks.decode --preset tiny")
    assert record["meta"]["mlx"] and record["meta"]["mlx_lm"]
    assert record["errors"] == []
    runs = {(r["impl"], r["batch"]): r for r in record["runs"]}
    assert set(runs) == {(impl, b) for impl in ("ours", "mlx-lm") for b in (1, 2)}
    for row in runs.values():
        assert row["decode_tok_s"] > 0
        # The host's share of a step, and its graph-building part, are measured, not guessed.
        assert 0 < row["build_ms_per_step"] <= row["host_ms_per_step"]
    assert runs["ours", 1]["prefill_tok_s"] > 0
    assert runs["ours", 1]["decode_ratio_vs_mlx_lm"] > 0
    assert runs["ours", 2]["decode_ratio_vs_mlx_lm_paired"] > 0


def test_speculative_benchmark_controls_acceptance(tmp_path):
    """Both projects, the same draft cost and the same per-position coin: full acceptance keeps
    every draft (but the last round's), none keeps none, and the output is plain decoding's."""
    from benchmarks import speculative

    out = tmp_path / "speculative_tiny"
    command = "--target draft-tiny --draft draft-tiny --k 3 --acceptance 1,0 --tokens 12 "
    command += "--prompt 8 --repeats 1 --dtype float32 --out"
    speculative.main([*command.split(), str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    rows = {(r["impl"], r["acceptance"]): r for r in record["rows"]}
    for impl in ("ours", "mlx-lm"):
        assert rows[impl, None]["decode_tok_s"] > 0
        assert rows[impl, 1.0]["measured_acceptance"] > 0.6
        assert rows[impl, 0.0]["measured_acceptance"] == 0
        assert rows[impl, 1.0]["same_tokens_as_plain"] and rows[impl, 0.0]["same_tokens_as_plain"]


def test_host_per_row_benchmark_writes_its_figures(tmp_path):
    """The server's per-row host work (text, hand-off, SSE chunk) is measured and recorded."""
    from benchmarks import host_per_row

    out = tmp_path / "host"
    record = host_per_row.main(["--tokens", "64", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text()) == record
    assert record["command"] == f"python -m benchmarks.host_per_row --tokens 64 --out {out}"
    parts = ("sequence_append_chat_us", "hand_off_us", "completion_chunk_us")
    assert all(record[k] > 0 for k in parts)
    assert abs(record["per_row_per_token_us"] - sum(record[k] for k in parts)) < 0.05

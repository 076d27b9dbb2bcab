"""The `qwen3-mlx` console script dispatches each subcommand to its module."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "qwen3_mlx.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_usage_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("convert", "generate", "chat", "serve", "bench"):
        assert f"  {command}" in out.stdout


def test_unknown_subcommand_is_one_line_error():
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_runs_the_decode_benchmark_from_a_checkout(tmp_path):
    out = run_cli(
        "bench", "--preset", "tiny", "--prompt", "8", "--gen", "4", "--batch", "1",
        "--repeats", "1", "--impl", "ours", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "bench.json").exists()

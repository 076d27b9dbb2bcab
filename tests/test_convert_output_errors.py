"""The converter on an output filesystem that refuses writes: read-only, full, out of inodes.

Each case runs the real converter (`python -m qwen3_mlx.convert`) on a tiny checkpoint and
expects exit code 1, a single `error: PATH: cannot write (CAUSE)` line on stderr, no traceback,
and the output filesystem exactly as it was before the run (no half-written model, no temporary
directory, no parent directories made for it, an existing `--force` target untouched).

The read-only and full filesystems are real tmpfs mounts (root on Linux, as in CI); those tests
skip where mounting isn't permitted. `test_unwritable_path_without_a_mount` runs everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_mlx.convert import convert
from tests.checkpoints import make_checkpoint, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OLD_MODEL = {"config.json": b'{"old": true}\n', "model.safetensors": b"old weights"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A dense checkpoint of ~560 KB (5 source shards) with tokenizer files."""
    root = tmp_path_factory.mktemp("source")
    return write_tokenizer(make_checkpoint(root / "dense", max_shard_size="100KB"))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs mount point, unmounted after the test."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("tmpfs mounts need Linux and mount(8)")
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def run_converter(src: Path, dst: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwen3_mlx.convert", "--hf-path", str(src), "--mlx-path", str(dst)]
    return subprocess.run(
        [*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`, hidden ones included, with the bytes of each file."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def write_old_model(dst: Path) -> None:
    dst.mkdir()
    for name, data in OLD_MODEL.items():
        (dst / name).write_bytes(data)


def assert_one_line_error(result: subprocess.CompletedProcess, dst: Path, cause: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {dst}: cannot write ({cause})"], result.stderr
    if "--no-progress" in result.args:
        assert result.stderr.splitlines() == errors  # nothing else on stderr


@pytest.mark.parametrize("target", ["out", "a/b/out", "existing"])
def test_read_only_filesystem(src, tmpfs, target):
    fs = tmpfs("size=1m")
    dst = fs / target
    flags = ["--no-progress"]
    if target == "existing":
        write_old_model(dst)
        flags.append("--force")
    remount(fs, "ro")
    before = snapshot(fs)

    result = run_converter(src, dst, *flags)

    assert_one_line_error(result, dst, "read-only file system")
    assert snapshot(fs) == before


def test_read_only_filesystem_refused_before_reading_the_source(tmpfs, tmp_path):
    """Checked up front, like the other destination rules: a hub download of hundreds of GB
    would otherwise come before the failure. Here the source isn't even a checkpoint."""
    fs = tmpfs("size=1m,ro")
    (tmp_path / "empty").mkdir()
    result = run_converter(tmp_path / "empty", fs / "out", "--no-progress")
    assert_one_line_error(result, fs / "out", "read-only file system")


@pytest.mark.parametrize("target", ["out", "a/b/out", "existing"])
def test_disk_full_while_writing_shards(src, tmpfs, target):
    """256 KB of space for ~560 KB of 50 KB output shards: the disk fills mid-way."""
    fs = tmpfs("size=256k")
    dst = fs / target
    flags = ["--max-shard-size", "50KB"]
    if target == "existing":
        write_old_model(dst)
        flags.append("--force")
    else:
        flags.append("--no-progress")  # "existing" keeps the progress bar on stderr
    before = snapshot(fs)

    result = run_converter(src, dst, *flags)

    assert "[INFO]" in result.stdout  # the checks passed and writing began
    assert_one_line_error(result, dst, "no space left on device")
    assert snapshot(fs) == before


@pytest.mark.parametrize("missing", [0, 1, 4])
def test_out_of_inodes_after_the_shards(src, tmpfs, tmp_path, missing):
    """Enough space but `missing` inodes too few: the shards and index are written, then
    creating config.json (1) or copying the tokenizer files (4) fails. 0 shows the count is
    exact: the conversion succeeds."""
    reference = convert(src, tmp_path / "reference", max_shard_size="100KB", progress=False)
    needed = 1 + len(list(reference.iterdir()))  # the temporary directory and its files
    fs = tmpfs("size=4m,nr_inodes=1000")
    in_use = os.statvfs(fs).f_files - os.statvfs(fs).f_ffree  # the root directory
    remount(fs, f"nr_inodes={in_use + needed - missing}")
    assert os.statvfs(fs).f_ffree == needed - missing
    dst = fs / "out"

    result = run_converter(src, dst, "--max-shard-size", "100KB", "--no-progress")

    if missing == 0:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(dst)) == sorted(os.listdir(reference))
        return
    assert_one_line_error(result, dst, "no space left on device")
    assert snapshot(fs) == {}


def test_unwritable_path_without_a_mount(src, tmp_path):
    """Runs without mount permission: a path through a regular file, and one under /proc,
    which refuses new directories even to root (caught while writing, not by the checks)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    dst = blocker / "out"
    result = run_converter(src, dst, "--no-progress")
    assert_one_line_error(result, dst, f"{blocker} is not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file"]

    if not sys.platform.startswith("linux"):
        return
    dst = Path("/proc/qwen3-mlx-convert-test")
    result = run_converter(src, dst, "--no-progress")
    cause = "no such file or directory" if os.geteuid() == 0 else "permission denied"
    assert_one_line_error(result, dst, cause)

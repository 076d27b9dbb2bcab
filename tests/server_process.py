"""Start `python -m qwen3_mlx.server` as a real process on a free port (server tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server, timeout: float, what: str, on_poll=lambda: None) -> None:
    """Poll `server.base`/health until it answers 200; fail (after `server.stop()`) with the log
    if `server.proc` exits or `timeout` passes. `on_poll` runs once per poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{server.output()}")
        on_poll()
        try:
            if httpx.get(server.base + "/health", timeout=1).status_code == 200:
                on_poll()
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{what} did not come up in {timeout:.0f}s:\n{server.output()}")


def wait_for(condition, timeout: float = 15.0, every: float = 0.05) -> bool:
    """Poll `condition()` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


class ServerProcess:
    def __init__(self, args: list[str], *, api_key: str | None = None, timeout: float = 180.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(
            "w+", prefix="qwen3-mlx-server-", suffix=".log", delete=False
        )
        command = [sys.executable, "-m", "qwen3_mlx.server", "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        wait_until_healthy(self, timeout, "server")

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=5).json()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

"""Joining the job mlx.launch started, and keeping its ranks in lockstep.

Every rank runs the same program on the same inputs; rank 0 alone talks to the outside world.
What comes from outside enters through `RankSync.share`, and every sampled token through
`share_tokens` (all ranks continue with rank 0's token).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import DistributedError, Qwen3MLXError
from .watchdog import Watchdog


@dataclass
class LaunchInfo:
    """What the launcher told this process (environment variables), read before MLX starts."""

    rank: int
    size: int
    backend: str  # ring | jaccl | nccl | mpi | any
    coordinator: tuple[str, int] | None  # where rank 0's watchdog listens (None: no watchdog)


def launch_info(env: dict[str, str] | None = None) -> LaunchInfo:
    """Rank, size, backend and watchdog address from the variables mlx.launch sets.

    ring: MLX_RANK + MLX_HOSTFILE (JSON, one list of "ip:port" per rank); the watchdog listens on
    rank 0's first ring address, port − 1. nccl: MLX_RANK, MLX_WORLD_SIZE, NCCL_HOST_IP, NCCL_PORT
    (+1). jaccl: MLX_RANK, MLX_IBV_DEVICES, MLX_JACCL_COORDINATOR (+1). mpi: OMPI_COMM_WORLD_*
    (mpirun ends the job itself when a rank dies). QWEN3_MLX_WATCHDOG=host:port overrides, =off disables.
    """
    env = os.environ if env is None else env
    info = LaunchInfo(0, 1, "any", None)
    try:
        if env.get("MLX_HOSTFILE") and "MLX_RANK" in env:
            text = Path(env["MLX_HOSTFILE"]).read_text().strip()
            hosts = json.loads(text) if text else []
            if len(hosts) > 1:
                host, port = hosts[0][0].rsplit(":", 1)
                info = LaunchInfo(int(env["MLX_RANK"]), len(hosts), "ring", (host, int(port) - 1))
        elif "NCCL_HOST_IP" in env:
            address = (env["NCCL_HOST_IP"], int(env["NCCL_PORT"]) + 1)
            info = LaunchInfo(int(env["MLX_RANK"]), int(env["MLX_WORLD_SIZE"]), "nccl", address)
        elif "MLX_JACCL_COORDINATOR" in env:
            host, port = env["MLX_JACCL_COORDINATOR"].rsplit(":", 1)
            size = len(json.loads(Path(env["MLX_IBV_DEVICES"]).read_text()))
            info = LaunchInfo(int(env["MLX_RANK"]), size, "jaccl", (host, int(port) + 1))
        elif "OMPI_COMM_WORLD_SIZE" in env:
            rank, size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
            info = LaunchInfo(rank, size, "mpi", None)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise DistributedError(f"cannot read the launcher's environment (MLX_*): {e}") from None
    override = env.get("QWEN3_MLX_WATCHDOG", "")
    if override == "off":
        info.coordinator = None
    elif override:
        host, _, port = override.rpartition(":")
        info.coordinator = (host or "127.0.0.1", int(port))
    return info


_watchdog: Watchdog | None = None
_group: Any = None


def init() -> Any:
    """Join the job mlx.launch started and return its group (a one-rank group when not launched).

    The watchdog starts first: if a peer never comes up, MLX's own set-up would wait forever.
    """
    global _watchdog, _group
    if _group is not None:
        return _group
    info = launch_info()
    if info.size > 1 and info.coordinator is not None and _watchdog is None:
        _watchdog = Watchdog(info.rank, info.size, info.coordinator).start()
    try:
        group = mx.distributed.init(strict=info.size > 1, backend=info.backend)
    except RuntimeError as e:
        raise DistributedError(
            f"rank {info.rank}: cannot start the {info.backend} backend: {e}"
        ) from None
    if group.size() != info.size:
        raise DistributedError(
            f"the launcher started {info.size} ranks but the {info.backend} backend sees {group.size()}"
        )
    _group = group
    return group


def is_leader() -> bool:
    return _group is None or _group.rank() == 0


@contextlib.contextmanager
def session():
    """Wrap one rank's work: a clean end tells the others so; an error ends the job everywhere.

    A collective that fails because a peer vanished gives the watchdog time to name that peer
    (it then ends this process with that message).
    """
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            if _watchdog is not None:
                _watchdog.finish()
            raise
        if _watchdog is not None:
            if isinstance(e, RuntimeError) and re.search(r"\[(ring|nccl|jaccl|mpi)\]", str(e)):
                _watchdog.await_verdict()
            if isinstance(e, KeyboardInterrupt):
                message = "interrupted (Ctrl-C)"
            elif isinstance(e, Qwen3MLXError):
                message = str(e)
            else:
                message = f"{type(e).__name__}: {e}"
            _watchdog.fail(message)
        raise
    else:
        if _watchdog is not None:
            _watchdog.finish()


class RankSync:
    """Copies of rank 0's inputs and tokens on every rank (one all-reduce each: x + 0 + … + 0 = x)."""

    def __init__(self, group: Any):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (any picklable value) on every rank; the others pass None. Blocking."""
        if self.size == 1:
            return obj
        payload = pickle.dumps(obj) if self.rank == 0 and obj is not None else b""
        n = mx.distributed.all_sum(mx.array([len(payload)], mx.int32), group=self.group).item()
        if n == 0:  # None (a pickle is never empty): one collective, not two
            return None
        if self.rank == 0:
            data = mx.array(np.frombuffer(payload, np.uint8))
        else:
            data = mx.zeros((n,), mx.uint8)
        data = mx.distributed.all_sum(data, group=self.group)
        return pickle.loads(np.array(data).tobytes())

    def share_tokens(self, tokens: mx.array) -> mx.array:
        """Rank 0's sampled `tokens` on every rank (lazy)."""
        if self.size == 1:
            return tokens
        # `tokens * 0`, not zeros: the follower's own forward pass (and in pipeline mode its
        # send to the next stage) must stay in the graph that evaluating the result runs.
        mine = tokens if self.rank == 0 else tokens * 0
        return mx.distributed.all_sum(mine, group=self.group)


@dataclass
class Sharding:
    """Attached to a sharded model as `model.distributed`."""

    parallel: str
    group: Any
    sync: RankSync

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()


def share_tokens(model: Any, tokens: mx.array) -> mx.array:
    """Every sampling loop calls this on its sampled tokens: identity unless `model` is sharded."""
    sharding = getattr(model, "distributed", None)
    return tokens if sharding is None else sharding.sync.share_tokens(tokens)


def share(model: Any, obj: Any) -> Any:
    """Rank 0's `obj` (a prompt, a request) on every rank: identity unless `model` is sharded."""
    sharding = getattr(model, "distributed", None)
    return obj if sharding is None else sharding.sync.share(obj)


def rank_main(main: Callable[[], int]) -> Callable[[], int]:
    """A command-line `main` for every rank of a job: rank 0 prints, the others stay quiet, and an
    error on any rank ends the job on all of them (see `session`)."""

    def run() -> int:
        init()
        with session(), contextlib.ExitStack() as stack:
            if not is_leader():
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            return main()

    return run

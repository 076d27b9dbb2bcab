"""Liveness of a distributed job's ranks, watched over a side TCP connection to rank 0."""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time

from ..errors import DistributedError

EXIT_LOST_RANK = 3  # exit status of a rank ended because another rank was lost
HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 20.0  # QWEN3_MLX_HEARTBEAT_TIMEOUT: silence that counts as "lost"
DEFAULT_STARTUP_TIMEOUT = 120.0  # QWEN3_MLX_STARTUP_TIMEOUT: every rank must check in by then


class Watchdog:
    """Heartbeats between rank 0 and every other rank over a side TCP connection (a star).

    Rank 0 notices a rank whose connection closes (process died or was killed), which reports an
    error, or which stays silent for `timeout` seconds (hung, asleep, cable pulled); it tells the
    others which rank was lost, and every rank exits with that message — from this thread, since
    the main thread may be blocked in a collective that has no timeout of its own. The other ranks
    watch rank 0 the same way.

    Lines on the wire: "HELLO rank size", "." (heartbeat), "BYE" (finished normally),
    "FAIL message" (to rank 0), "LOST rank reason" (from rank 0).
    """

    def __init__(
        self,
        rank: int,
        size: int,
        address: tuple[str, int],
        *,
        timeout: float | None = None,
        startup_timeout: float | None = None,
    ):
        self.rank, self.size, self.address = rank, size, address
        env = os.environ
        self.timeout = timeout or float(
            env.get("QWEN3_MLX_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT)
        )
        self.startup_timeout = startup_timeout or float(
            env.get("QWEN3_MLX_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT)
        )
        self.interval = min(HEARTBEAT_INTERVAL, self.timeout / 4)
        self.peers: dict[int, socket.socket] = {}
        self.last_seen: dict[int, float] = {}
        self.pending: dict[int, bytes] = {}
        self.done: set[int] = set()  # ranks that said BYE
        self.finishing = False
        self.lock = threading.Lock()

    def start(self) -> Watchdog:
        self._rendezvous()
        threading.Thread(target=self._run, name="qwen3-mlx-watchdog", daemon=True).start()
        return self

    # -- called from the main thread

    def finish(self) -> None:
        self.finishing = True
        self._broadcast("BYE")

    def fail(self, message: str) -> None:
        """This rank failed: the others end with `message` naming this rank."""
        self.finishing = True
        message = " ".join(message.split())[:500]
        if self.rank == 0:
            self._broadcast(f"LOST 0 failed: {message}")
            self._linger()
        else:
            self._broadcast(f"FAIL {message}")

    def await_verdict(self) -> None:
        """A collective failed: wait (bounded) for this thread to learn and report which rank left."""
        time.sleep(self.timeout + 2 * self.interval)

    # -- set-up

    def _rendezvous(self) -> None:
        host, port = self.address
        deadline = time.monotonic() + self.startup_timeout
        if self.rank != 0:
            while True:
                try:
                    sock = socket.create_connection((host, port), timeout=2.0)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise DistributedError(
                            f"rank {self.rank}: cannot reach rank 0 at {host}:{port} within "
                            f"{self.startup_timeout:.0f} s ({e}); is rank 0 running, and is its "
                            "address in the hostfile reachable from this machine?"
                        ) from None
                    time.sleep(0.2)
            sock.sendall(f"HELLO {self.rank} {self.size}\n".encode())
            self.peers[0] = sock
            return
        try:
            server = socket.create_server((host, port))
        except OSError as e:
            raise DistributedError(
                f"rank 0: cannot listen on {host}:{port} for the watchdog ({e})"
            ) from None
        server.settimeout(0.5)
        with server:
            while len(self.peers) < self.size - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.size)) - set(self.peers))
                    raise DistributedError(
                        f"rank 0: rank(s) {', '.join(map(str, missing))} did not check in at "
                        f"{host}:{port} within {self.startup_timeout:.0f} s (not started, crashed "
                        "while starting, or blocked by a firewall)"
                    )
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                rank, size = self._read_hello(conn)
                if size != self.size or not 0 < rank < self.size or rank in self.peers:
                    conn.close()
                    raise DistributedError(
                        f"rank 0: inconsistent launch: a process says it is rank {rank} of {size}, "
                        f"this job has {self.size} ranks"
                    )
                self.peers[rank] = conn

    @staticmethod
    def _read_hello(conn: socket.socket) -> tuple[int, int]:
        conn.settimeout(5.0)
        data = b""
        while not data.endswith(b"\n") and len(data) < 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            data += chunk
        try:
            word, rank, size = data.decode().split()
            assert word == "HELLO"
            return int(rank), int(size)
        except (ValueError, AssertionError, UnicodeDecodeError):
            return -1, -1

    # -- the thread

    def _run(self) -> None:
        now = time.monotonic()
        self.last_seen = dict.fromkeys(self.peers, now)
        next_beat = 0.0
        while self.peers:
            by_socket = {s: r for r, s in self.peers.items()}
            readable, _, _ = select.select(list(by_socket), [], [], self.interval / 2)
            for sock in readable:
                self._read(by_socket[sock])
            now = time.monotonic()
            if now >= next_beat:
                self._broadcast(".")
                next_beat = now + self.interval
            for rank in list(self.peers):
                silent = now - self.last_seen[rank]
                if silent > self.timeout and not self.finishing:
                    self._lost(
                        rank, f"no heartbeat for {silent:.0f} s (hung, asleep or unreachable)"
                    )

    def _read(self, rank: int) -> None:
        try:
            data = self.peers[rank].recv(4096)
        except OSError as e:
            data, error = b"", f"its connection failed ({e})"
        else:
            error = "its connection closed (the process exited or was killed)"
        if not data:
            if rank in self.done or self.finishing:
                self.peers.pop(rank).close()
                return
            self._lost(rank, error)
        self.last_seen[rank] = time.monotonic()
        *lines, self.pending[rank] = (self.pending.get(rank, b"") + data).split(b"\n")
        for line in lines:
            word, _, rest = line.decode(errors="replace").partition(" ")
            if word == "BYE":
                self.done.add(rank)
            elif word == "FAIL":
                self._lost(rank, f"it failed: {rest}")
            elif word == "LOST":
                lost, _, reason = rest.partition(" ")
                self._die(int(lost), reason)

    def _lost(self, rank: int, reason: str) -> None:
        if self.rank == 0:  # tell the others first, so they don't take our exit for the failure
            self._broadcast(f"LOST {rank} {reason}", skip=rank)
            self._linger(skip=rank)
        self._die(rank, reason)

    def _die(self, rank: int, reason: str) -> None:
        sys.stderr.write(
            f"\nerror: distributed job: lost rank {rank} of {self.size}: {reason}; "
            f"stopping rank {self.rank}\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_LOST_RANK)

    def _broadcast(self, line: str, skip: int | None = None) -> None:
        data = (line + "\n").encode()
        with self.lock:
            for rank, sock in list(self.peers.items()):
                if rank == skip:
                    continue
                try:
                    sock.settimeout(2.0)
                    sock.sendall(data)
                except OSError:
                    pass  # a closed peer shows up as such on the read side

    def _linger(self, skip: int | None = None, seconds: float = 2.0) -> None:
        """Give the others a moment to read our last line and close their ends."""
        waiting = {s for r, s in self.peers.items() if r != skip}
        deadline = time.monotonic() + seconds
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(list(waiting), [], [], 0.1)
            for sock in readable:
                try:
                    if not sock.recv(4096):
                        waiting.discard(sock)
                except OSError:
                    waiting.discard(sock)

"""The server's one MLX thread: a request queue, prefill, and continuously batched decode.

Every request becomes a row of its model's running batch. Each turn of the loop

    1. admits queued requests (up to --max-concurrency rows in flight) and drops cancelled ones,
    2. prefills one chunk of waiting prompts (reusing the longest cached prefix; while rows decode,
       at most PREFILL_SHARE of the time), moving a prompt whose prefill is done into the batch: its
       KV cache is copied into a free slot of the batch's `Slots` (slots.py), so it joins
       mid-flight without disturbing the others or changing the step's compiled shape,
    3. runs one decode step for the whole batch through `generation.step`, the step the Python
       API runs: it queues step N+1 on the device before it reads step N's tokens, so turning
       tokens into text and events never holds the device up (a batch with a grammar-constrained
       row reads first: its mask depends on the token before).

Finished or cancelled rows leave the batch at once (their slot is freed); their KV cache is kept
in the prefix store so the next turn of the conversation prefills only its new tokens.

Isolation: a failure while prefilling, masking, sampling or reading one row ends that request
alone with a `Failed` event; a batched step that fails is retried row by row to find the
offender; the loop itself never dies. MLX arrays are only made on this thread.

Nothing else in the server touches MLX: HTTP handlers submit `GenerationRequest`s and read
events from a `Channel`; embeddings and other model calls go through `Engine.call`. (A model
loaded on demand is read on a worker thread with every array evaluated there, then handed to
this thread, which warms it up and serves it: residency.py.)

`--parallel` (under mlx.launch): every rank runs this same loop on its shard of the model, in
lockstep. Rank 0 alone serves HTTP. `_admit` is the single place where anything from outside
enters the loop: there rank 0 shares each turn's new requests (as plain data), cancellations and
shutdown with the other ranks, which rebuild the requests and run the same steps; every sampled
token is rank 0's (`share_tokens`). So every decision the loop takes is a function of shared data
only: a cancellation takes effect in `_admit` (never when the client leaves), and the prefix
store is sized by tokens, not by this rank's bytes. (Per-row isolation is off there: a step that
failed on one rank can't be patched up on that rank alone.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import mlx.core as mx

from .batch import Batch, Row, warm_up
from .decode import DecodeLoop
from .jobs import Channel, Discard, EngineBusy, Failed, Finished, GenerationRequest, Output
from .models import LoadedModel
from .prefill import PrefillLoop
from .prefix import PREFIX_MIN, PrefixStore, kv_bytes_per_token
from .rehearsal import Rehearsal
from .residency import Residency
from .turns import TurnClock

__all__ = [
    "Channel",
    "Discard",
    "Engine",
    "EngineBusy",
    "Failed",
    "Finished",
    "GenerationRequest",
    "Output",
]

log = logging.getLogger("qwen3_mlx.server")

# --parallel, nothing to do: rank 0 waits this long for a request before its turn's share, and the
# other ranks sleep as long before joining it (MLX's ring backend spins while it waits).
IDLE_TURN = 0.05


# -- the engine --------------------------------------------------------------------------------


class Engine(PrefillLoop, DecodeLoop, Residency, Rehearsal):
    def __init__(
        self,
        models: list[LoadedModel],
        *,
        max_concurrency: int = 16,
        max_queue: int = 64,
        prefill_step: int = 512,
        prefix_cache_entries: int = 16,
        prefix_cache_bytes: int = 2 << 30,
        warmup: bool = True,
        rehearse: bool | None = None,
    ):
        self.models = models
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.prefill_step = prefill_step
        self._inbox: queue.Queue = queue.Queue()
        self._calls: queue.Queue = queue.Queue()
        self._waiting: list[GenerationRequest] = []  # admitted order, not yet prefilling
        self._prefilling: list[Row] = []
        self._batches = {m.id: Batch(m) for m in models if m.kind == "llm"}
        # --parallel: the ranks' lockstep (None on one process: no collectives at all).
        self._sync = next(
            (
                m.model.distributed.sync
                for m in models
                if getattr(m.model, "distributed", None) is not None
                and m.model.distributed.size > 1
            ),
            None,
        )
        self.leader = self._sync is None or self._sync.is_leader
        self.prefix_cache_entries = prefix_cache_entries  # each model's store (residency.py too)
        self.prefix_cache_bytes = prefix_cache_bytes
        self._prefixes = {
            m.id: PrefixStore(
                prefix_cache_entries,
                prefix_cache_bytes,
                kv_bytes_per_token(m.model) if self._sync is not None else None,
            )
            for m in models
        }
        self._ids = itertools.count(1)
        self._queued = 0  # submitted, not yet active (guarded by _lock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.warmup = warmup
        # The start-up rehearsal (rehearsal.py), by default where kernels are compiled on first use
        # (Metal, CUDA); on MLX's CPU backend it would cost seconds of sampling and find nothing.
        if rehearse is None:
            rehearse = mx.default_device().type == mx.DeviceType.gpu
        self.rehearse = warmup and rehearse
        # Prefill beside decode (PREFILL_SHARE): decode seconds banked towards the next chunk,
        # and the prefill's measured seconds per token (first from the warm-up).
        self._decode_credit = 0.0
        self._prefill_seconds_per_token = 0.0
        self.ready = threading.Event()  # set once the warm-up is done (or skipped)
        self._thread = threading.Thread(target=self._serve, name="qwen3-mlx-engine", daemon=True)
        self.steps = 0
        self.cancelled = 0  # requests whose client left before they finished
        self.failed = 0  # requests ended by an error in the engine
        self.failing = 0  # ... of them since a request last finished well
        self.last_error: str | None = None
        # --parallel: the error that ended the job (rank 0), and who to tell (stops the server).
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None
        # Told of every request's end on the engine thread (the /metrics counters).
        self.on_finished: Callable[[str, Finished], None] | None = None

    # -- called from the HTTP side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # Requests that failed in a row, with none finishing well in between, before /health says so.
    FAILING_AFTER = 3

    def health(self) -> str:
        """Either "ok", "failing" (the last FAILING_AFTER requests all ended in an engine error and none
        finished since) or "engine stopped"."""
        if not self.alive:
            return "engine stopped"
        return "failing" if self.failing >= self.FAILING_AFTER else "ok"

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._queued >= self.max_queue:
                raise EngineBusy(
                    f"server busy: {self._queued} requests already waiting (--max-queue "
                    f"{self.max_queue}) and {self.max_concurrency} in flight; retry shortly"
                )
            self._queued += 1
            request.holds_queue_place = True
            request.id = next(self._ids)
        self._inbox.put(request)

    def withdraw(self, request: GenerationRequest) -> None:
        """A queued request whose client left gives its queue place back now, not at the
        engine's next turn: a client that hangs up and sends again at once is not refused."""
        self._dequeued(request)

    def wake(self) -> None:
        """Nudge the loop (e.g. after a cancellation) so it frees the slot now."""
        self._inbox.put(None)

    async def call(self, fn, *args):
        """Run `fn(*args)` on the engine thread (the only one that may touch MLX)."""
        future: Future = Future()
        self._calls.put((future, fn, args))
        self._inbox.put(None)
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, int]:
        return {
            "running": sum(len(b.rows) for b in self._batches.values()),
            "prefilling": len(self._prefilling),
            "queued": self._queued,
            "steps": self.steps,
            "cancelled": self.cancelled,
            "failed": self.failed,
        }

    def follow(self) -> None:
        """`--parallel`, ranks other than 0: run the loop in this thread until rank 0 stops it."""
        self._warm_up()
        self._run()

    # -- the loop ------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Trace and compile every step shape before the first request (see batch.warm_up)."""
        try:
            if self.warmup:
                started = time.perf_counter()
                for batch in self._batches.values():
                    rate = warm_up(batch.loaded, self.max_concurrency, self.prefill_step)
                    self._prefill_seconds_per_token = max(self._prefill_seconds_per_token, rate)
                    if self.rehearse and self._sync is None:  # not for ranks in lockstep
                        self._rehearse(batch.loaded, self.max_concurrency)
                log.info("warm-up: %.1f s", time.perf_counter() - started)
        except Exception as e:  # a slower first request, not a reason to refuse all of them
            if self._sync is not None:
                raise
            log.warning("warm-up failed: %s: %s", type(e).__name__, e)
        finally:
            self.ready.set()

    def _serve(self) -> None:
        if self._sync is None:
            self._warm_up()
            return self._run()
        try:
            self._warm_up()
            self._run()
        except BaseException as e:  # --parallel only: the job is over (see _run)
            log.error("the distributed job failed: %s: %s", type(e).__name__, e)
            self.fatal = e
            self._fail_all(f"the distributed job failed: {type(e).__name__}: {e}")
            if self.on_fatal is not None:
                self.on_fatal()

    def _run(self) -> None:
        clock = TurnClock()
        while True:
            idle = not (self._prefilling or self._waiting or self._running())
            if idle:
                mx.clear_cache()  # give freed KV buffers back while nothing runs
            turn_started = time.perf_counter()
            if not self._admit(block=idle):
                return
            self._run_calls()
            try:
                admitted = time.perf_counter()
                self._prefill_turn()
                started = time.perf_counter()
                rows, buckets = 0, []
                for batch in self._batches.values():
                    if batch.rows:
                        rows += len(batch.rows)
                        buckets.append(batch.slots.size if batch.slots is not None else 1)
                        self._decode_step(batch)
                decoded = time.perf_counter()
                if self._prefilling:
                    self._decode_credit += decoded - started
                else:
                    self._decode_credit = 0.0  # nothing banked while nothing waits
                clock.turn(
                    0.0 if idle else admitted - turn_started,
                    started - admitted,
                    decoded - started,
                    rows,
                    buckets,
                )
            except Exception as e:  # a bug, not a user error: fail what is in flight, go on
                if self._sync is not None:
                    # The ranks run in lockstep: a step that failed on this rank can't be patched
                    # up here alone (and a lost rank's "[ring]" error is for the watchdog to name).
                    raise
                log.exception("engine step failed")
                self.last_error = f"{type(e).__name__}: {e}"
                self._fail_all(f"internal error in the engine: {self.last_error}")

    def _running(self) -> bool:
        return any(b.rows for b in self._batches.values())

    def _in_flight(self) -> Iterator[GenerationRequest]:
        yield from self._waiting
        yield from (row.request for row in self._prefilling)
        for batch in self._batches.values():
            yield from (row.request for row in batch.rows)

    def _take_inbox(self, timeout: float | None) -> list[GenerationRequest]:
        """New requests (wake-ups are None), waiting up to `timeout` for the first item."""
        arrived = []
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
            while True:
                if item is not None:
                    arrived.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return arrived

    def _admit(self, block: bool) -> bool:
        """Take new requests, cancellations and the stop signal; False when the loop must end.

        Under `--parallel` rank 0 shares them with the other ranks here, once per turn."""
        if self.leader:
            if self._sync is None and self._stop.is_set():
                return False
            wait = (0.5 if self._sync is None else IDLE_TURN) if block else None
            arrived = self._take_inbox(wait)
            self._waiting.extend(arrived)
            cancels = [r for r in self._in_flight() if r.cancel_requested and not r.cancelled]
            stop = self._stop.is_set()
            if self._sync is not None:
                news = {"new": [r.spec() for r in arrived], "cancel": [r.id for r in cancels]}
                self._sync.share({**news, "stop": stop} if arrived or cancels or stop else None)
        else:
            if block:
                time.sleep(IDLE_TURN)  # as long as rank 0 waits: neither spins in the collective
            turn = self._sync.share(None) or {"new": [], "cancel": [], "stop": False}
            for spec in turn["new"]:
                request = GenerationRequest.rebuild(spec, self._llm(spec["model"]))
                self._waiting.append(request)
                with self._lock:
                    self._queued += 1
                    request.holds_queue_place = True
            ids = set(turn["cancel"])
            cancels = [r for r in self._in_flight() if r.id in ids]
            stop = turn["stop"]
        for request in cancels:
            request.cancelled = True
        if stop and self._sync is not None:
            return False
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._dequeued(request)
            self._finish_cancelled(request)
        in_flight = len(self._prefilling) + sum(len(b.rows) for b in self._batches.values())
        while self._waiting and in_flight < self.max_concurrency:
            request = self._waiting.pop(0)
            self._dequeued(request)
            self._prefilling.append(self._start_prefill(request))
            in_flight += 1
        return True

    def _llm(self, model_id: str) -> LoadedModel:
        return self._batches[model_id].loaded

    def _dequeued(self, request: GenerationRequest) -> None:
        with self._lock:
            if request.holds_queue_place:
                request.holds_queue_place = False
                self._queued -= 1

    def _run_calls(self) -> None:
        while True:
            try:
                future, fn, args = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def _drop_cancelled(self, batch: Batch) -> None:
        keep = [i for i, r in enumerate(batch.rows) if not r.request.cancelled]
        if len(keep) < len(batch.rows):
            for i, row in enumerate(batch.rows):
                if row.request.cancelled:
                    self._retire(batch, i, row)
            batch.keep(keep)

    def _retire(self, batch: Batch, index: int, row: Row) -> None:
        """Send the final event and keep the row's KV cache for the next turn."""
        request = row.request
        if len(row.fed) >= PREFIX_MIN and row.sequence.finish_reason != "error":
            layers = batch.extract(index, len(row.fed))
            if layers is not None:
                self._prefixes[request.model.id].store(row.fed, layers)
        seq = row.sequence
        if not seq.finished:  # cancelled, or a grammar that can no longer be satisfied
            reason = "abort" if request.cancelled else "stop"
            self.cancelled += request.cancelled
            out = seq.abort(reason)
            if out.text or out.tool_calls:
                request.channel.put(Output(out))
        if seq.finish_reason != "error":
            request.channel.put(self._finished(row))
            self.failing = 0

    def _finished(self, row: Row) -> Finished:
        finished = row.finished()
        if self.on_finished is not None:
            self.on_finished(row.request.model.id, finished)
        return finished

    def _finish_cancelled(self, request: GenerationRequest, row: Row | None = None) -> None:
        row = row or Row(request)
        self.cancelled += 1
        if not row.sequence.finished:
            row.sequence.abort("abort")
        request.channel.put(self._finished(row))

    def _fail(self, request: GenerationRequest, error: BaseException, where: str) -> None:
        """End one request with an error; nobody else is affected."""
        log.error("request %s failed in %s: %s: %s", request.id, where, type(error).__name__, error)
        self.failed += 1
        self.failing += 1
        self.last_error = f"{where}: {type(error).__name__}: {error}"
        if not request.sequence.finished:
            request.sequence.abort("error")
        request.channel.put(Failed(f"internal error ({where}): {type(error).__name__}: {error}"))

    def _fail_all(self, message: str) -> None:
        for batch in self._batches.values():
            for row in batch.rows:
                row.request.channel.put(Failed(message))
                self.failing += 1
            batch.rows, batch.cache, batch.step, batch.queued = [], None, None, None
        for row in self._prefilling:
            row.request.channel.put(Failed(message))
            self.failing += 1
        self._prefilling = []

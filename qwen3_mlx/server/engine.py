"""The server's one MLX thread: a request queue, prefill, and continuously batched decode.

Every request becomes a row of its model's running batch. Each turn of the loop

    1. admits queued requests (up to --max-concurrency rows in flight) and drops cancelled ones,
    2. prefills one chunk of waiting prompts (reusing the longest cached prefix), moving a prompt
       whose prefill is done into the batch: its KV cache is left-padded and appended to the
       batch's `BatchKVCache`, so it joins mid-flight without disturbing the others,
    3. runs one decode step for the whole batch: one forward pass of B tokens, each row's own
       penalties / grammar mask / sampling parameters, then each row's `Sequence` turns its token
       into text deltas and decides whether the row is finished.

Finished or cancelled rows leave the batch at once (`BatchKVCache.filter`); their KV cache is kept
in a small prefix store so the next turn of the conversation prefills only its new tokens.

Nothing else in the server touches MLX: HTTP handlers submit `GenerationRequest`s and read
events from a `Channel`; embeddings and other model calls go through `Engine.call`.

`--parallel` (under mlx.launch): every rank runs this same loop on its shard of the model, in
lockstep. Rank 0 alone serves HTTP. `_admit` is the single place where anything from outside
enters the loop: there rank 0 shares each turn's new requests (as plain data), cancellations and
shutdown with the other ranks, which rebuild the requests and run the same steps; every sampled
token is rank 0's (`share_tokens`). So every decision the loop takes is a function of shared data
only: a cancellation takes effect in `_admit` (never when the client leaves), and the prefix
store is sized by tokens, not by this rank's bytes.
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
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..distributed.job import share_tokens
from ..generate import Sequence, TokenLogprob, forward
from ..sampling import BatchSampler, SamplingParams, apply_penalties, gather_logprobs, log_softmax
from .constrain import Constraint
from .models import LoadedModel

log = logging.getLogger("qwen3_mlx.server")

# --parallel, nothing to do: rank 0 waits this long for a request before its turn's share, and the
# other ranks sleep as long before joining it (MLX's ring backend spins while it waits).
IDLE_TURN = 0.05


class EngineBusy(Exception):
    """The queue is full: the request is refused (503) rather than waiting without bound."""


# -- what the HTTP side hands in and gets back -------------------------------------------------


@dataclass
class Output:
    """What one decode step produced for one request: a `generate.SequenceOutput`."""

    step: Any  # SequenceOutput: text, reasoning, content, tool_calls, logprobs, finish_reason


@dataclass
class Finished:
    finish_reason: str  # stop | length | tool_calls | cancelled
    stop_reason: str  # LM Studio's: eosFound | stopStringFound | maxPredictedTokensReached ...
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    time_to_first_token: float
    generation_time: float


@dataclass
class Failed:
    message: str


class Channel:
    """Engine thread → one asyncio consumer. Events arrive in order; `None` never appears."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down)

    async def get(self):
        return await self.queue.get()


class Discard:
    """The channel of a request a `--parallel` follower runs for rank 0: nobody reads it."""

    def put(self, event) -> None:
        pass


@dataclass
class GenerationRequest:
    model: LoadedModel
    prompt: list[int]
    sequence: Sequence
    params: SamplingParams  # resolved
    channel: Channel
    constraint: Constraint | None = None
    # Where the prompt leaves the model: "thinking" | "answer" | "open" (template's wording).
    prompt_state: str = "open"
    cancelled: bool = False  # set by the engine only, in `_admit` (every rank sees it there)
    cancel_requested: bool = False  # the client left; the engine's next turn cancels
    id: int = 0  # given by `Engine.submit`; names the request to `--parallel` followers
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancel_requested = True

    def spec(self) -> dict[str, Any]:
        """The request as plain data, from which a `--parallel` follower rebuilds it."""
        seq = self.sequence
        return {
            "id": self.id,
            "model": self.model.id,
            "prompt": self.prompt,
            "params": self.params,
            "prompt_state": self.prompt_state,
            "thinking_budget": seq.thinking_budget,
            "parse_tools": seq.parser.parse_tools,
            "max_tokens": seq.max_tokens,
            "constraint": self.constraint.spec if self.constraint is not None else None,
        }

    @classmethod
    def rebuild(cls, spec: dict[str, Any], model: LoadedModel) -> GenerationRequest:
        from .prepare import grammar_factory

        seq = Sequence(
            model.tokenizer,
            spec["prompt"],
            spec["params"],
            prompt_state=spec["prompt_state"],
            thinking_budget=spec["thinking_budget"],
            parse_tools=spec["parse_tools"],
            vocab_size=model.model.args.vocab_size,
        )
        seq.max_tokens = spec["max_tokens"]
        constraint = None
        if spec["constraint"] is not None:
            constraint = grammar_factory(model).rebuild(spec["constraint"])
        return cls(
            model,
            spec["prompt"],
            seq,
            spec["params"],
            Discard(),
            constraint,
            spec["prompt_state"],
            id=spec["id"],
        )


# -- prefix store ------------------------------------------------------------------------------


class PrefixStore:
    """KV caches of recent sequences, keyed by the tokens they hold (least recently used out).

    `token_bytes`: count each entry as its tokens x this instead of its arrays' bytes, which differ
    from rank to rank under `--parallel` (eviction must be the same decision everywhere).
    """

    def __init__(
        self, max_entries: int = 16, max_bytes: int = 2 << 30, token_bytes: int | None = None
    ):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.token_bytes = token_bytes
        self.entries: list[tuple[list[int], list[KVCache]]] = []

    def lookup(self, prompt: list[int]) -> tuple[int, list[KVCache] | None]:
        """(tokens reused, fresh caches holding them). At least one prompt token is left over."""
        best, best_len = None, 0
        for i, (tokens, _) in enumerate(self.entries):
            n = _common_prefix(tokens, prompt)
            if n > best_len:
                best, best_len = i, n
        best_len = min(best_len, len(prompt) - 1)
        if best is None or best_len <= 0:
            return 0, None
        tokens, layers = self.entries.pop(best)
        self.entries.append((tokens, layers))  # most recently used last
        return best_len, [_copy_prefix(c, best_len) for c in layers]

    def store(self, tokens: list[int], layers: list[KVCache]) -> None:
        if not tokens:
            return
        # An entry that this one extends is redundant.
        self.entries = [
            e for e in self.entries if _common_prefix(e[0], tokens) < min(len(e[0]), len(tokens))
        ]
        self.entries.append((list(tokens), layers))
        while len(self.entries) > self.max_entries or (
            len(self.entries) > 1 and self.nbytes > self.max_bytes
        ):
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        if self.token_bytes is not None:
            return sum(len(tokens) for tokens, _ in self.entries) * self.token_bytes
        return sum(c.nbytes for _, layers in self.entries for c in layers)


def kv_bytes_per_token(model) -> int:
    """KV cache bytes per token of the whole model (every layer, every KV head), whatever part of
    it this process holds: the same number on every rank."""
    args = model.args
    dtype = next(layer for layer in model.layers if layer is not None).input_layernorm.weight.dtype
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype.size


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _copy_prefix(cache: KVCache, n: int) -> KVCache:
    # Slicing makes new arrays, so the stored entry is never written through this copy.
    copy = KVCache()
    copy.keys = cache.keys[..., :n, :]
    copy.values = cache.values[..., :n, :]
    copy.offset = n
    return copy


# -- rows of a batch ---------------------------------------------------------------------------


class _Row:
    """One request in flight: its cache while prefilling, then its place in the batch."""

    def __init__(self, request: GenerationRequest, think_start: int, think_end: int):
        self.request = request
        self.sequence = request.sequence
        self.want_logprobs = bool(request.params.logprobs or request.params.top_logprobs)
        self.top_logprobs = int(request.params.top_logprobs or 0)
        # Prefill state.
        self.cache: list[KVCache] | None = None
        self.cached_tokens = 0
        self.prefilled = 0  # prompt tokens in self.cache
        # Decode state.
        self.next_input = request.prompt[-1]
        self.fed: list[int] = list(request.prompt[:-1])  # tokens whose K/V the cache holds
        self.fed_count = 0  # generated tokens fed so far
        self.first_token_at: float | None = None
        # Grammar gating: constrain the answer, leave the think block free.
        self.think_start, self.think_end = think_start, think_end
        self.phase = request.prompt_state  # "thinking" | "answer" | "open"

    @property
    def constrained(self) -> bool:
        return self.request.constraint is not None and self.phase != "thinking"

    def mask(self, logits: mx.array) -> mx.array:
        also = (self.think_start,) if self.phase == "open" else ()
        return self.request.constraint.apply(logits, also)

    def track(self, token: int) -> None:
        if token == self.think_start and self.phase != "answer":
            self.phase = "thinking"
        elif token == self.think_end and self.phase == "thinking":
            self.phase = "answer"
        elif self.phase != "thinking":
            self.phase = "answer"
            if self.request.constraint is not None:
                self.request.constraint.consume(token)


class _Batch:
    """The running batch of one model: rows, their shared BatchKVCache, their sampler."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.rows: list[_Row] = []
        self.cache: list[BatchKVCache] | None = None
        self.sampler: BatchSampler | None = None

    def add(self, row: _Row) -> None:
        incoming = [BatchKVCache.merge([c]) for c in row.cache]
        if self.cache is None:
            self.cache = incoming
        else:
            for mine, theirs in zip(self.cache, incoming, strict=True):
                mine.extend(theirs)
        row.cache = None
        self.rows.append(row)
        self.sampler = None

    def extract(self, index: int) -> list[KVCache]:
        return [c.extract(index) for c in self.cache]

    def keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = None
        else:
            for c in self.cache:
                c.filter(indices)
        self.sampler = None


# -- the engine --------------------------------------------------------------------------------


class Engine:
    def __init__(
        self,
        models: list[LoadedModel],
        *,
        max_concurrency: int = 16,
        max_queue: int = 64,
        prefill_step: int = 512,
        prefix_cache_entries: int = 16,
        prefix_cache_bytes: int = 2 << 30,
    ):
        self.models = models
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.prefill_step = prefill_step
        self._inbox: queue.Queue = queue.Queue()
        self._calls: queue.Queue = queue.Queue()
        self._waiting: list[GenerationRequest] = []  # admitted order, not yet prefilling
        self._prefilling: list[_Row] = []
        self._batches = {m.id: _Batch(m) for m in models if m.kind == "llm"}
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
        self._thread = threading.Thread(target=self._serve, name="qwen3-mlx-engine", daemon=True)
        self.steps = 0
        self.cancelled = 0  # requests whose client left before they finished
        self.last_error: str | None = None
        # --parallel: the error that ended the job (rank 0), and who to tell (stops the server).
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None

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

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._queued >= self.max_queue:
                raise EngineBusy(
                    f"server busy: {self._queued} requests already waiting (--max-queue "
                    f"{self.max_queue}) and {self.max_concurrency} in flight; retry shortly"
                )
            self._queued += 1
            request.id = next(self._ids)
        self._inbox.put(request)

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
        }

    def follow(self) -> None:
        """`--parallel`, ranks other than 0: run the loop in this thread until rank 0 stops it."""
        self._run()

    # -- the loop ------------------------------------------------------------------------------

    def _serve(self) -> None:
        if self._sync is None:
            return self._run()
        try:
            self._run()
        except BaseException as e:  # --parallel only: the job is over (see _run)
            log.error("the distributed job failed: %s: %s", type(e).__name__, e)
            self.fatal = e
            self._fail_all(f"the distributed job failed: {type(e).__name__}: {e}")
            if self.on_fatal is not None:
                self.on_fatal()

    def _run(self) -> None:
        while True:
            idle = not (self._prefilling or self._waiting or self._running())
            if idle:
                mx.clear_cache()  # give freed KV buffers back while nothing runs
            if not self._admit(block=idle):
                return
            self._run_calls()
            try:
                self._prefill_chunk()
                for batch in self._batches.values():
                    if batch.rows:
                        self._decode_step(batch)
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
                self._waiting.append(GenerationRequest.rebuild(spec, self._llm(spec["model"])))
                with self._lock:
                    self._queued += 1
            ids = set(turn["cancel"])
            cancels = [r for r in self._in_flight() if r.id in ids]
            stop = turn["stop"]
        for request in cancels:
            request.cancelled = True
        if stop and self._sync is not None:
            return False
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._dequeued()
            self._finish_cancelled(request)
        in_flight = len(self._prefilling) + sum(len(b.rows) for b in self._batches.values())
        while self._waiting and in_flight < self.max_concurrency:
            request = self._waiting.pop(0)
            self._dequeued()
            self._prefilling.append(self._start_prefill(request))
            in_flight += 1
        return True

    def _llm(self, model_id: str) -> LoadedModel:
        return self._batches[model_id].loaded

    def _dequeued(self) -> None:
        with self._lock:
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

    # -- prefill -------------------------------------------------------------------------------

    def _start_prefill(self, request: GenerationRequest) -> _Row:
        tok = request.model.tokenizer
        row = _Row(request, tok.think_start_id, tok.think_end_id)
        n_layers = len(request.model.model.layers)
        cached, layers = self._prefixes[request.model.id].lookup(request.prompt)
        row.cache = layers or [KVCache() for _ in range(n_layers)]
        row.cached_tokens = row.prefilled = cached
        return row

    def _prefill_chunk(self) -> None:
        """Spend up to `prefill_step` tokens of prefill, oldest request first."""
        budget = self.prefill_step
        for row in list(self._prefilling):
            if budget <= 0:
                break
            request = row.request
            if request.cancelled:
                self._prefilling.remove(row)
                self._finish_cancelled(request, row)
                continue
            todo = request.prompt[row.prefilled : len(request.prompt) - 1]
            chunk = todo[:budget]
            if chunk:
                # The body only: prefill needs the KV cache, not logits over the vocabulary.
                request.model.model.model(mx.array([chunk]), cache=row.cache)
                mx.eval([c.state for c in row.cache])
                row.prefilled += len(chunk)
                budget -= len(chunk)
            if row.prefilled >= len(request.prompt) - 1:
                self._prefilling.remove(row)
                prefix = request.prompt[:-1]
                if len(prefix) >= 16:
                    self._prefixes[request.model.id].store(
                        prefix, [_copy_prefix(c, len(prefix)) for c in row.cache]
                    )
                self._batches[request.model.id].add(row)
            else:
                budget = 0  # a long prompt keeps its place; decode runs between its chunks

    # -- decode --------------------------------------------------------------------------------

    def _decode_step(self, batch: _Batch) -> None:
        """One token for every row: the hot path of the server."""
        self._drop_cancelled(batch)
        if not batch.rows:
            return
        rows = batch.rows
        sequences = [r.sequence for r in rows]
        for r in rows:
            if r.fed_count:  # the first input is the prompt's last token, not a generated one
                r.sequence.observe(mx.array([r.next_input]))
        inputs = mx.array([[r.next_input] for r in rows])
        logits = forward(batch.loaded.model, inputs, batch.cache)
        logits = apply_penalties(logits, [s.penalties for s in sequences])
        # Grammar masks shape rank 0's sampling only (the others take its tokens).
        if self.leader and any(r.constrained for r in rows):
            logits = mx.concatenate(
                [
                    r.mask(logits[i : i + 1]) if r.constrained else logits[i : i + 1]
                    for i, r in enumerate(rows)
                ],
                axis=0,
            )
        # Sampling is shift-invariant per row, so the full-vocabulary log-softmax (an exp per
        # vocabulary entry per row) is only computed when someone asked for logprobs.
        top_n = max((r.top_logprobs for r in rows if r.want_logprobs), default=-1)
        scores = log_softmax(logits) if top_n >= 0 else logits
        if batch.sampler is None:
            batch.sampler = BatchSampler([s.params for s in sequences])
        keys = None if batch.sampler.all_greedy else mx.stack([s.rng.next_key() for s in sequences])
        tokens = batch.sampler(scores, keys)
        tokens = share_tokens(batch.loaded.model, tokens)  # --parallel: rank 0's tokens
        gathered = gather_logprobs(scores, tokens, top_n) if top_n >= 0 else None
        mx.eval(tokens, gathered)
        self.steps += 1

        sampled = tokens.tolist()
        if gathered is not None:
            chosen, top_ids, top_values = (x.tolist() if x is not None else None for x in gathered)
        now = time.perf_counter()
        keep = []
        for i, row in enumerate(rows):
            seq = row.sequence
            row.fed.append(row.next_input)
            row.fed_count += 1
            forced = seq.forced_token
            token = sampled[i] if forced is None else forced
            logprob = None
            if row.want_logprobs and forced is None:
                top = list(zip(top_ids[i], top_values[i], strict=True)) if top_ids else []
                logprob = TokenLogprob(token, chosen[i], top[: row.top_logprobs])
            row.track(token)
            if row.first_token_at is None:
                row.first_token_at = now
            out = seq.append(token, logprob)
            if out.text or out.tool_calls or out.logprobs is not None or out.finish_reason:
                row.request.channel.put(Output(out))
            row.next_input = token
            if (
                seq.finished
                or row.request.cancelled
                or (row.request.constraint and row.request.constraint.failed)
            ):
                self._retire(batch, i, row)
            else:
                keep.append(i)
        if len(keep) < len(rows):
            batch.keep(keep)

    def _drop_cancelled(self, batch: _Batch) -> None:
        keep = [i for i, r in enumerate(batch.rows) if not r.request.cancelled]
        if len(keep) < len(batch.rows):
            for i, row in enumerate(batch.rows):
                if row.request.cancelled:
                    self._retire(batch, i, row)
            batch.keep(keep)

    def _retire(self, batch: _Batch, index: int, row: _Row) -> None:
        """Send the final event and keep the row's KV cache for the next turn."""
        request = row.request
        if len(row.fed) >= 16:
            self._prefixes[request.model.id].store(row.fed, batch.extract(index))
        seq = row.sequence
        if not seq.finished:  # cancelled, or a grammar that can no longer be satisfied
            reason = "abort" if request.cancelled else "stop"
            self.cancelled += request.cancelled
            out = seq.abort(reason)
            if out.text or out.tool_calls:
                request.channel.put(Output(out))
        request.channel.put(self._finished(row))

    def _finished(self, row: _Row) -> Finished:
        seq = row.sequence
        end = time.perf_counter()
        first = row.first_token_at or end
        reason = seq.finish_reason or "abort"
        if reason == "abort":
            stop_reason = "userStopped"
        elif reason == "length":
            stop_reason = "maxPredictedTokensReached"
        elif seq.tokens and seq.tokens[-1] in seq.stop_ids:
            stop_reason = "eosFound"
        else:
            stop_reason = "stopStringFound"
        return Finished(
            finish_reason=reason,
            stop_reason=stop_reason,
            prompt_tokens=len(row.request.prompt),
            completion_tokens=len(seq.tokens),
            reasoning_tokens=seq.thinking_tokens,
            cached_tokens=row.cached_tokens,
            time_to_first_token=first - row.request.submitted_at,
            generation_time=end - first,
        )

    def _finish_cancelled(self, request: GenerationRequest, row: _Row | None = None) -> None:
        row = row or _Row(request, -1, -1)
        self.cancelled += 1
        if not row.sequence.finished:
            row.sequence.abort("abort")
        request.channel.put(self._finished(row))

    def _fail_all(self, message: str) -> None:
        for batch in self._batches.values():
            for row in batch.rows:
                row.request.channel.put(Failed(message))
            batch.rows, batch.cache, batch.sampler = [], None, None
        for row in self._prefilling:
            row.request.channel.put(Failed(message))
        self._prefilling = []

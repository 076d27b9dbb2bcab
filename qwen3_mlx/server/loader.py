"""Models loaded on demand: a request naming a model of the catalog (catalog.py) that is not
loaded loads it (just in time, as LM Studio's JIT loading), and loaded models are unloaded when
idle too long (their TTL) or to make room (least recently used first).

- **Once.** Concurrent requests for the same cold model share one load (one task per name);
  loads run one at a time, so the memory check and the room each makes are not raced.
- **Held while used.** A request holds every model it named until its response has been
  sent, a stream's last event included (`HoldModels`, the outermost ASGI layer): a model with
  requests in flight is never unloaded, by TTL or eviction. An explicit unload of such a model
  is refused (503), as is a load that could only make room by unloading one.
- **Room.** With `--max-loaded-models N`, loading an (N+1)th model first unloads the least
  recently used idle one. Before reading any weights the loader checks memory: the checkpoint's
  safetensors bytes (what its weights take in memory) against what is available (Metal: the
  recommended working set less MLX's active memory; Linux: /proc/meminfo's MemAvailable, which
  already leaves out MLX's buffers, plus the freed ones MLX keeps cached); idle models are
  unloaded to make room if that suffices, else the load is refused (503, naming the model, its
  size and the memory available).
- **TTL.** A model loaded on demand gets the request's `ttl` (LM Studio's: it applies to the
  load the request makes, as in LM Studio) or `keep_alive` (Ollama's: it becomes the model's
  TTL whether the request loads it or not, as in Ollama), else `--ttl` (default 3600 s, LM
  Studio's for JIT-loaded models); one loaded at start (--model) or by
  `POST /api/v1/models/load` has none unless its load or a `keep_alive` gives one. The idle
  time counts from the last request's end; 0 unloads the model when its last request ends.

Threads: all of the above is decided on the event loop. The weights are read on a worker thread,
every array evaluated there (MLX binds a lazy array to the stream of the thread that made it:
ARCHITECTURE.md), then the engine thread warms the model up and serves it; unloading also runs
on the engine thread (residency.py). Other models' requests keep running while a model is read;
they pause while it warms up (its compiles run on the engine thread).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .catalog import CatalogEntry, ModelCatalog
from .models import LoadedModel, ModelNotFound, ModelRegistry, load_served_model

log = logging.getLogger("qwen3_mlx.server")

DEFAULT_TTL = 3600.0  # seconds: LM Studio's idle TTL for models it loads just in time
UNSET: Any = object()  # a request that says nothing of the TTL (None: stay loaded)


def ttl_of(body) -> float | None:
    """A request's `ttl` (LM Studio's), or UNSET when it gives none."""
    ttl = getattr(body, "ttl", None)
    return UNSET if ttl is None else ttl


# The residents the current HTTP request holds (set per request by `HoldModels`).
HELD: ContextVar[list | None] = ContextVar("qwen3_mlx_held_models", default=None)


class LoadRefused(Exception):
    """A model can't be loaded (or unloaded) now: a 503 naming why."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def gib(n: float) -> str:
    """Bytes for people: GiB, or MiB below one."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def available_memory() -> int | None:
    """Bytes a new model may take (None: unknown, no check)."""
    if mx.metal.is_available():
        info = mx.device_info()
        total = info.get("max_recommended_working_set_size") or info.get("memory_size")
        return int(total) - mx.get_active_memory() if total else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    # MLX's live buffers are already in use there; its cache is freed on demand.
                    return int(line.split()[1]) * 1024 + mx.get_cache_memory()
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class LoadOptions:
    """How models are loaded (the server's flags); a load may give its own context length."""

    context_length: int | None = None
    long_context: bool = False
    kv_bits: int | None = None
    kv_group_size: int = 64
    max_kv_size: int | None = None


@dataclass(eq=False)
class Resident:
    """A loaded model and what decides its unloading."""

    model: LoadedModel
    ttl: float | None  # idle seconds before it is unloaded; None: it stays
    last_used: float = field(default_factory=time.monotonic)
    holders: int = 0  # requests holding it
    load_seconds: float = 0.0

    def expires_in(self, now: float) -> float | None:
        if self.ttl is None or self.holders:
            return None
        return self.last_used + self.ttl - now


@dataclass
class Hold:
    model: LoadedModel
    load_seconds: float | None = None  # the load this request waited for (None: none)


class ModelLoader:
    def __init__(
        self,
        registry: ModelRegistry,
        engine,
        catalog: ModelCatalog,
        *,
        options: LoadOptions | None = None,
        ttl: float | None = DEFAULT_TTL,
        max_loaded: int | None = None,
    ):
        self.registry, self.engine, self.catalog = registry, engine, catalog
        self.options = options or LoadOptions()
        self.ttl, self.max_loaded = ttl, max_loaded
        registry.any_name = False  # names resolve here, against the catalog
        # --parallel: every rank holds the same models in lockstep, from start to end.
        self.frozen = getattr(engine, "_sync", None) is not None
        self.residents = {m.id: Resident(m, None) for m in registry}
        self._loading: dict[str, asyncio.Future] = {}
        # Requests waiting for a model's load: it is theirs as soon as it is loaded (neither
        # its TTL nor another load's eviction may take it before they resume and hold it).
        self._pending: Counter[str] = Counter()
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._wake = asyncio.Event()  # a hold ended or a TTL changed: look again
        self._reaper: asyncio.Task | None = None

    @classmethod
    def serving(cls, registry: ModelRegistry, engine) -> ModelLoader:
        """A loader for models loaded by the caller (an embedded app, tests): its catalog is
        them, reloaded from their directories if unloaded; no TTL, no limit."""
        pinned = [CatalogEntry.of_loaded(m, str(m.path), m.kind == "embeddings") for m in registry]
        return cls(registry, engine, ModelCatalog([], pinned), ttl=None)

    # -- names --------------------------------------------------------------------------------

    def lookup(self, name: str | None, kind: str | None = None, any_name: bool = True):
        """The loaded model or catalog entry `name` names (ModelNotFound: none). Without a
        name: the one model (of `kind`) there is."""
        if name:
            found = self.registry.find(name)
            if found is not None:
                return found
            entry = self.catalog.find(name)
            if entry is None and any_name and self.catalog.any_name:
                entry = self.catalog.entries()[0]
            if entry is not None:
                return self.registry.models.get(entry.id, entry)
            known = [e.id for e in self.catalog.entries()]
            listed = ", ".join(sorted(known)[:20]) + (", …" if len(known) > 20 else "")
            raise ModelNotFound(f"model {name!r} not found; available: {listed or 'none'}")
        everything = [m or e for e, m in self.listing()]
        fitting = [m for m in everything if kind is None or m.kind == kind]
        loaded = [m for m in fitting if isinstance(m, LoadedModel)]
        for candidates in (loaded, fitting, everything):  # (the last: the route says its kind)
            if len(candidates) == 1:
                return candidates[0]
        raise ModelNotFound(
            "several models can serve this request: name one in 'model' (GET /v1/models lists them)"
        )

    def listing(self) -> list[tuple[CatalogEntry | None, LoadedModel | None]]:
        """Every model: (catalog entry, the model if loaded); loaded ones first."""
        entries = {e.id: e for e in self.catalog.entries()}
        loaded = [(entries.get(m.id), m) for m in self.registry]
        return loaded + [(e, None) for e in entries.values() if e.id not in self.registry.models]

    def expires_at(self, model_id: str) -> float | None:
        """When (time.time()) the model unloads if no other request comes (one serving
        requests: its TTL from now); None: it stays."""
        resident = self.residents.get(model_id)
        if resident is None or resident.ttl is None:
            return None
        left = resident.expires_in(time.monotonic())
        return time.time() + (resident.ttl if left is None else max(left, 0.0))

    # -- requests -----------------------------------------------------------------------------

    def acquire_loaded(self, name: str | None, kind: str | None = None) -> LoadedModel:
        """A loaded model for this request, held until its response ends; one not loaded is a
        404 (routes that can await use `acquire`, which loads it)."""
        found = self.lookup(name, kind)
        if isinstance(found, CatalogEntry):
            raise ModelNotFound(f"model {found.id!r} is not loaded")
        self._hold(self.residents[found.id], UNSET)
        return found

    async def acquire(
        self,
        name: str | None,
        *,
        kind: str | None = None,
        ttl: Any = UNSET,
        keep_alive: Any = UNSET,
        context_length: int | None = None,
        any_name: bool = True,
    ) -> Hold:
        """The model `name` names, loaded if it is not, held until this request's response
        ends. If this request loads it: `ttl` (LM Studio's: seconds, None: stay loaded; else
        --ttl) is its TTL and `context_length` its context. `keep_alive` (Ollama's) becomes
        its TTL whether this request loads it or not."""
        waited = None
        for _ in range(3):  # a model unloaded between its load and this request's turn: again
            found = self.lookup(name, kind, any_name)
            if isinstance(found, CatalogEntry):
                started = time.monotonic()
                default = next(t for t in (keep_alive, ttl, self.ttl) if t is not UNSET)
                self._pending[found.id] += 1
                try:
                    await self.load(found, context_length=context_length, ttl=default)
                finally:  # then, with no await in between, this request holds it (below)
                    self._pending[found.id] -= 1
                    self._wake.set()
                waited = time.monotonic() - started
                continue
            self._hold(self.residents[found.id], keep_alive)
            return Hold(found, waited)
        raise LoadRefused(f"model {name!r} was unloaded as it loaded; retry", "model_unloaded")

    def _idle(self, resident: Resident) -> bool:
        """Neither held by a request nor awaited by one (its load just ended)."""
        return not resident.holders and not self._pending[resident.model.id]

    def _due(self, resident: Resident, now: float) -> bool:
        """Idle past its TTL (and still the loaded one of its name)."""
        left = resident.expires_in(now)
        current = self.residents.get(resident.model.id) is resident
        return current and self._idle(resident) and left is not None and left <= 0

    def _hold(self, resident: Resident, ttl: Any) -> None:
        resident.last_used = time.monotonic()
        if ttl is not UNSET and not self.frozen:
            resident.ttl = ttl
        held = HELD.get()
        if held is not None:  # (outside an HTTP request nothing would end a hold: none taken)
            resident.holders += 1
            held.append(resident)
        self._watch()

    def release(self, resident: Resident) -> None:
        resident.holders -= 1
        resident.last_used = time.monotonic()
        if not resident.holders:
            self._wake.set()

    def set_ttl(self, model_id: str, ttl: float | None) -> None:
        """A request's TTL for a loaded model it doesn't use (Ollama's `keep_alive` alone)."""
        resident = self.residents.get(model_id)
        if resident is not None and not self.frozen:
            resident.ttl, resident.last_used = ttl, time.monotonic()
            self._watch()

    # -- loading ------------------------------------------------------------------------------

    async def load(
        self, entry: CatalogEntry, *, context_length: int | None = None, ttl: float | None = None
    ) -> tuple[LoadedModel, float]:
        """Load `entry` unless it is loaded (or loading: then wait for that load). Returns the
        model and the seconds its load took (0.0: it was loaded)."""
        resident = self.residents.get(entry.id)
        if resident is not None:
            return resident.model, 0.0
        self._check_not_frozen()
        task = self._loading.get(entry.id)
        if task is None:
            task = asyncio.ensure_future(self._load(entry, context_length, ttl))
            self._loading[entry.id] = task
            task.add_done_callback(lambda _: self._loading.pop(entry.id, None))
        # Shielded: a client that leaves doesn't cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, entry: CatalogEntry, context_length: int | None, ttl: float | None):
        async with self._lock:
            if entry.id in self.residents:  # loaded while this waited for the lock
                return self.residents[entry.id].model, 0.0
            await self._make_room(entry)
            started = time.monotonic()
            log.info("loading %s (%s) ...", entry.id, gib(entry.size_bytes))
            loaded = await asyncio.to_thread(self._read, entry, context_length)
            await self.engine.call(self.engine.add_model, loaded)
            seconds = time.monotonic() - started
            self.registry.add(loaded)
            self.residents[entry.id] = Resident(loaded, ttl, load_seconds=seconds)
            log.info("loaded %s in %.1f s", entry.id, seconds)
            self._watch()
            return loaded, seconds

    def _read(self, entry: CatalogEntry, context_length: int | None) -> LoadedModel:
        """Worker thread: config, weights and tokenizer, every array evaluated here."""
        o = self.options
        loaded = load_served_model(
            entry.source,
            embedding=entry.embedding,
            model_id=entry.id,
            context_length=context_length or o.context_length,
            long_context=o.long_context,
            kv_bits=o.kv_bits,
            kv_group_size=o.kv_group_size,
            max_kv_size=o.max_kv_size,
        )
        loaded.publisher = entry.publisher
        mx.eval(loaded.model.parameters())  # no-op when evaluated; never lazy past this thread
        return loaded

    async def _make_room(self, entry: CatalogEntry) -> None:
        """Unload what --max-loaded-models and memory ask for, or refuse (nothing unloaded)."""
        idle = sorted(filter(self._idle, self.residents.values()), key=lambda r: r.last_used)
        victims: list[Resident] = []
        if self.max_loaded is not None:
            excess = len(self.residents) + 1 - self.max_loaded
            if excess > len(idle):
                busy = len(self.residents) - len(idle)
                raise LoadRefused(
                    f"can't load model '{entry.id}': {len(self.residents)} models are loaded "
                    f"(--max-loaded-models {self.max_loaded}) and {busy} of them are serving "
                    "requests; retry when they finish",
                    "model_limit_reached",
                )
            victims = idle[: max(excess, 0)]
        available = available_memory()
        if available is not None:
            freed = sum(r.model.weights_bytes for r in victims)
            spare = idle[len(victims) :]
            while entry.size_bytes > available + freed and spare:
                victims.append(spare.pop(0))
                freed += victims[-1].model.weights_bytes
            if entry.size_bytes > available + freed:
                raise LoadRefused(
                    f"not enough memory to load model '{entry.id}': its weights take "
                    f"{gib(entry.size_bytes)} and {gib(available + freed)} is available"
                    + (f" (after unloading the {len(victims)} idle models)" if victims else ""),
                    "insufficient_memory",
                )
        await self._unload(victims)

    def _check_not_frozen(self) -> None:
        if self.frozen:
            raise LoadRefused(
                "under --parallel the models are the ones loaded at start", "models_fixed"
            )

    # -- unloading ----------------------------------------------------------------------------

    async def unload(self, model_id: str) -> None:
        """Unload a model now (POST /api/v1/models/unload); refused while requests hold it."""
        self._check_not_frozen()
        async with self._lock:
            resident = self.residents.get(model_id)
            if resident is None:
                raise ModelNotFound(f"no loaded model {model_id!r}")
            if not self._idle(resident):
                raise LoadRefused(
                    f"model '{model_id}' is serving {resident.holders} request(s); unload it when "
                    "they finish",
                    "model_busy",
                )
            await self._unload([resident])

    async def _unload(self, residents: list[Resident]) -> None:
        # Out of the registry first, all at once: no request can take one of them meanwhile.
        for r in residents:
            self.residents.pop(r.model.id, None)
            self.registry.remove(r.model.id)
        for r in residents:
            await self.engine.call(self.engine.remove_model, r.model.id)
            log.info("unloaded %s", r.model.id)

    # -- idle TTL -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Start the reaper (on the event loop, at the first model with a TTL) or wake it."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        self._wake.set()

    async def _reap(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            waits = [
                (left, r)
                for r in filter(self._idle, self.residents.values())
                if (left := r.expires_in(now)) is not None
            ]
            due = [r for r in self.residents.values() if self._due(r, now)]
            if due:
                async with self._lock:
                    now = time.monotonic()
                    due = [r for r in due if self._due(r, now)]  # again, under the lock
                    try:
                        await self._unload(due)
                    except Exception:  # never let one failed unload stop the others' TTLs
                        log.exception("unloading an idle model failed")
                continue
            timeout = min((left for left, _ in waits), default=None)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass


class HoldModels:
    """ASGI middleware: the models a request names stay loaded until its response is sent."""

    def __init__(self, app, loader: ModelLoader):
        self.app, self.loader = app, loader

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list[Resident] = []
        token = HELD.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            HELD.reset(token)
            for resident in held:
                self.loader.release(resident)

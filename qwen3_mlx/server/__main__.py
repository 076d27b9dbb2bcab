"""`python -m qwen3_mlx.server`: serve Qwen3 models the way LM Studio does (port 1234, /v1, /api/v0).

With `--parallel` under mlx.launch every rank loads its shard of the chat models; rank 0 serves
HTTP and the others follow its engine in lockstep (see engine.py) until rank 0 stops: Ctrl-C (the
terminal signals every rank; only rank 0 acts on it), SIGTERM to rank 0, or the launcher going
away. An error on any rank ends the job on all of them (`distributed.session`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading

from ..errors import Qwen3MLXError
from .options import build_parser


def return_large_frees_to_the_system() -> None:
    """glibc keeps freed heap memory for reuse: after one 15 MB request body, its copies stayed in
    the server's RSS for good (measured by benchmarks/serve_load.py). Allocations of 128 KiB and
    more are given their own mapping instead, which free() returns."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.server") -> int:
    args = build_parser(prog).parse_args(argv)
    return_large_frees_to_the_system()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        for name, value in (
            ("--max-concurrency", args.max_concurrency),
            ("--max-queue", args.max_queue),
            ("--max-tokens-limit", args.max_tokens_limit),
            ("--prefill-step", args.prefill_step),
            ("--max-loaded-models", args.max_loaded_models),
            ("--mcp-max-calls", args.mcp_max_calls),
        ):
            if value is not None and value < 1:
                raise Qwen3MLXError(f"{name} {value}: must be at least 1")
        if not args.read_timeout > 0:
            raise Qwen3MLXError(f"--read-timeout {args.read_timeout}: must be positive")
        if not args.mcp_timeout > 0:
            raise Qwen3MLXError(f"--mcp-timeout {args.mcp_timeout}: must be positive")
        if args.parallel and args.mcp_config:
            raise Qwen3MLXError("--mcp-config: not with --parallel")
        if args.parallel:
            return serve_distributed(args)
        app = build_app_with_mcp(args)
    except Qwen3MLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    import uvicorn

    print(
        f"qwen3-mlx server on http://{args.host}:{args.port}/v1 ({models_summary(app)})",
        file=sys.stderr,
        flush=True,
    )
    if args.ui:
        print(f"chat page: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, **uvicorn_options(args))
    return 0


def uvicorn_options(args: argparse.Namespace) -> dict:
    from .guard import read_timeout_protocol

    return dict(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
        http=read_timeout_protocol(args.read_timeout),
    )


def models_summary(app) -> str:
    loaded = [m.id for m in app.state.registry]
    catalog = app.state.loader.catalog
    text = f"models: {', '.join(loaded) or 'none loaded'}"
    if catalog.dirs:
        more = len([e for e in catalog.entries() if e.id not in loaded])
        text += f"; {more} more on demand from {', '.join(map(str, catalog.dirs))}"
    return text


def build_app_with_mcp(args: argparse.Namespace):
    """build_app, with --mcp-config's servers (mcp_tools.McpHub) started first: they come up
    while the models load, and one that can't start ends the start-up with its error."""
    if args.mcp_config is None:
        return build_app(args)
    from pathlib import Path

    from .mcp_tools import McpHub

    mcp = McpHub.from_file(Path(args.mcp_config), args.mcp_timeout, args.mcp_max_calls)
    mcp.start()
    try:
        app = build_app(args, mcp=mcp)
        mcp.wait_ready()
    except BaseException:
        mcp.close()
        raise
    return app


def build_app(args: argparse.Namespace, leader: bool = True, mcp=None):
    """The FastAPI app (its engine is `app.state.engine`). `--parallel` ranks other than 0 (not
    `leader`) load only the chat models, and their app is never served."""
    from pathlib import Path

    from ..assets import resolve_model_argument
    from ..errors import ConfigError
    from .app import Settings, create_app
    from .catalog import CatalogEntry, ModelCatalog, default_model_dirs, demo_entry
    from .engine import Engine
    from .loader import LoadOptions, ModelLoader
    from .models import ModelRegistry, is_embedding_model, load_served_model

    if args.parallel and args.models_dir:
        raise ConfigError(
            "--models-dir: not with --parallel (every rank loads its models at start)"
        )
    # Models on demand: from --models-dir, or without --model from the default directories.
    on_demand = not args.parallel and bool(args.models_dir or not args.model)
    dirs = [Path(d).expanduser() for d in args.models_dir]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--models-dir {d}: no such directory")
    if on_demand and not dirs:
        dirs = default_model_dirs()
    sources = [(m, None) for m in (args.model or [])] + [(m, True) for m in args.embedding]
    if not sources and not on_demand:
        sources = [(resolve_model_argument(None, notice=leader), None)]
    models, given = [], []  # given: (what loaded each model, --embedding), to reload it
    for source, embedding in sources:
        if args.parallel and embedding is None:
            embedding = is_embedding_model(source, args.parallel)
        if embedding and not leader:
            continue  # embedding models stay whole, on rank 0
        if leader:
            print(f"loading {source} ...", file=sys.stderr, flush=True)
        models.append(
            load_served_model(
                source,
                embedding=embedding,
                context_length=args.context_length,
                parallel=None if embedding else args.parallel,
                long_context=args.long_context,
                kv_bits=args.kv_bits,
                kv_group_size=args.kv_group_size,
                max_kv_size=args.max_kv_size,
            )
        )
        given.append((source, embedding))
    if args.draft_model is not None or args.prompt_lookup is not None:
        add_drafting(models, args)
    if args.max_loaded_models is not None and len(models) > args.max_loaded_models:
        raise ConfigError(
            f"--max-loaded-models {args.max_loaded_models}: fewer than the {len(models)} models "
            "given to load at start"
        )
    pinned = [
        CatalogEntry.of_loaded(m, source, embedding)
        for m, (source, embedding) in zip(models, given, strict=True)
    ]
    catalog = ModelCatalog(dirs, pinned)
    if not catalog.entries():
        demo = demo_entry()
        if demo is None:
            raise ConfigError("no model to serve: give --model or --models-dir")
        print(
            "No model in the model directories: serving the built-in demo model, loaded when "
            "first asked for",
            file=sys.stderr,
        )
        catalog.pinned.append(demo)
    registry = ModelRegistry(models, allow_empty=True)
    engine = Engine(
        models,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        prefill_step=args.prefill_step,
        prefix_cache_bytes=int(args.prompt_cache_mb * (1 << 20)),
        warmup=args.warmup,
    )
    settings = Settings(
        api_key=args.api_key,
        cors=args.cors,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        bind_host=args.host,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        reasoning_format=args.reasoning_format,
        responses_store_size=max(args.responses_store_size, 0),
        responses_max_age=args.responses_max_age,
        ui=args.ui,
        mcp=mcp,
    )
    loader = ModelLoader(
        registry,
        engine,
        catalog,
        options=LoadOptions(
            context_length=args.context_length,
            long_context=args.long_context,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_size=args.max_kv_size,
        ),
        ttl=args.ttl if args.ttl >= 0 else None,
        max_loaded=args.max_loaded_models,
    )
    return create_app(registry, engine, settings, loader)


def add_drafting(models: list, args: argparse.Namespace) -> None:
    """--draft-model / --prompt-lookup for every chat model (a draft of another vocabulary, or
    a bounded cache, is one line of error)."""
    from ..assets import resolve_model_argument
    from ..errors import ConfigError, GenerationError
    from ..generation.speculative import DraftModel, PromptLookup, load_draft
    from .models import Drafting

    if args.parallel:
        raise ConfigError("--draft-model / --prompt-lookup: not with --parallel")
    if args.max_kv_size is not None:
        raise ConfigError(
            "--draft-model / --prompt-lookup: not with --max-kv-size (a windowed "
            "cache can't be rewound after a wrong draft)"
        )
    if args.num_draft_tokens < 1:
        raise ConfigError(f"--num-draft-tokens {args.num_draft_tokens}: must be at least 1")
    draft, name = None, f"prompt-lookup-{args.prompt_lookup}"
    if args.draft_model is not None:
        if args.prompt_lookup is not None:
            raise ConfigError("give --draft-model or --prompt-lookup, not both")
        source = resolve_model_argument(args.draft_model)
        print(f"loading draft model {source} ...", file=sys.stderr, flush=True)
        draft, name = load_draft(source), str(args.draft_model)
    for m in models:
        if m.kind != "llm":
            continue
        try:
            DraftModel(draft, m.model) if draft is not None else PromptLookup(args.prompt_lookup)
        except GenerationError as e:
            message = str(e).replace("draft_model", "--draft-model")
            raise ConfigError(message.replace("prompt_lookup", "--prompt-lookup")) from None
        m.drafting = Drafting(args.num_draft_tokens, draft, name, args.prompt_lookup)


def serve_distributed(args: argparse.Namespace) -> int:
    """Every rank of an mlx.launch job: rank 0 serves HTTP, the others follow its engine."""
    import uvicorn

    from .. import distributed

    distributed.init()
    with distributed.session():
        leader = distributed.is_leader()
        app = build_app(args, leader)
        engine = app.state.engine
        if not leader:
            # Rank 0 decides when the job ends and tells the others (Ctrl-C reaches every rank).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            _when_launcher_gone(lambda: None)
            engine.follow()
            return 0
        config = uvicorn.Config(app, **uvicorn_options(args))
        server = uvicorn.Server(config)

        def stop(*_):
            server.should_exit = True

        engine.on_fatal = stop
        signal.signal(signal.SIGHUP, stop)
        _when_launcher_gone(stop)
        print(
            f"qwen3-mlx server on http://{args.host}:{args.port}/v1 "
            f"(models: {', '.join(m.id for m in app.state.registry)}; --parallel "
            f"{args.parallel} over {distributed.init().size()} ranks)",
            file=sys.stderr,
            flush=True,
        )
        server.run()
        if engine.fatal is not None:
            raise engine.fatal
        return 0


def _when_launcher_gone(callback) -> None:
    """mlx.launch holds every local rank's stdin open and its output pipes: when it is gone
    (killed), stdin ends. Then nobody reads our output any more (it goes to /dev/null, so a
    last log line can't fail), and `callback` runs (rank 0: a clean shutdown of the job)."""
    if "MLX_RANK" not in os.environ or not stat.S_ISFIFO(os.fstat(0).st_mode):
        return

    def watch():
        try:
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        callback()

    threading.Thread(target=watch, name="qwen3-mlx-launcher-watch", daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())

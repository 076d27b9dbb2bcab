"""The `qwen3-mlx` console script: one subcommand per tool, each the module's own main().

    qwen3-mlx convert  ...   = python -m qwen3_mlx.convert ...
    qwen3-mlx generate ...   = python -m qwen3_mlx.generate ...
    qwen3-mlx chat     ...   = python -m qwen3_mlx.chat ...
    qwen3-mlx evaluate ...   = python -m qwen3_mlx.evaluate ...
    qwen3-mlx serve    ...   = python -m qwen3_mlx.server ...
    qwen3-mlx bench    ...   = the benchmarks' entry point

Modules are imported only when their subcommand runs, so `qwen3-mlx --help` is instant.
Each main() is told its program name ("qwen3-mlx generate"), so its usage line and errors read
as the command the user typed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

# subcommand -> (modules to try, in order, for a main(argv) function; one-line help)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "convert": (
        ("qwen3_mlx.convert",),
        "convert a Hugging Face checkpoint, GGUF file or Ollama model to MLX (optionally quantized)",
    ),
    "generate": (("qwen3_mlx.generate",), "generate one reply from a prompt"),
    "chat": (("qwen3_mlx.chat",), "chat in the terminal"),
    "evaluate": (
        ("qwen3_mlx.evaluate",),
        "perplexity over a text; KL divergence and top-1 agreement against a reference model",
    ),
    "serve": (
        ("qwen3_mlx.server.__main__", "qwen3_mlx.server"),
        "run the LM Studio-compatible server",
    ),
    "kernels": (("qwen3_mlx.kernels.__main__",), "check the fused GPU kernels on this machine"),
    # benchmarks/ lives beside the package in a source checkout (it is not installed).
    "bench": (("benchmarks.decode",), "decode/prefill speed next to mlx-lm (from a checkout)"),
}


def usage() -> str:
    lines = ["usage: qwen3-mlx <command> [options]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `qwen3-mlx <command> --help` for a command's options."]
    return "\n".join(lines)


def find_main(command: str):
    """The `main` function behind `command`, or None when no module provides it."""
    if command == "bench" and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # benchmarks/ is importable from the checkout's root
    for name in COMMANDS[command][0]:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Only a missing module of our own means "not here"; a missing dependency is real.
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue
            raise
        if callable(getattr(module, "main", None)):
            return module.main
    return None


def call_main(entry, argv: list[str], prog: str):
    """`entry(argv)` with its argparse program name set to `prog`: passed as `prog=` when the
    main() takes one, else through sys.argv[0] (argparse's default program name)."""
    try:
        takes_prog = "prog" in inspect.signature(entry).parameters
    except (TypeError, ValueError):
        takes_prog = False
    if takes_prog:
        return entry(argv, prog=prog)
    saved = sys.argv[:]
    sys.argv[:1] = [prog]
    try:
        return entry(argv)
    finally:
        sys.argv[:] = saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(version("qwen3-mlx"))
        except PackageNotFoundError:
            print("qwen3-mlx (not installed)")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    entry = find_main(command)
    if entry is None:
        modules = " or ".join(COMMANDS[command][0])
        print(
            f"error: '{command}' is not available in this installation ({modules} missing)",
            file=sys.stderr,
        )
        return 1
    result = call_main(entry, rest, f"qwen3-mlx {command}")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())

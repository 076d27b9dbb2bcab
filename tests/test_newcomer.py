"""What a newcomer meets first: `load()` without a path, the generate CLI's stats line, `--help`
stating every default, and usage lines naming the command that was typed."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CAPITAL = "What is the capital of France?"
CAPITAL_ANSWER = "The capital of France is Paris."


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "1000"}
    return subprocess.run(
        list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- 1. load() with no argument: the demo model ----------------------------------------------


def test_load_without_a_path_is_the_demo_model(demo_model_dir, capsys):
    from qwen3_mlx import generate, load
    from qwen3_mlx.assets import DEMO_MODEL_PATH

    if demo_model_dir != DEMO_MODEL_PATH:
        pytest.skip("$QWEN3_MLX_TEST_DEMO points elsewhere; load() uses the embedded one")
    model, tokenizer = load()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "built-in demo model" in err and str(DEMO_MODEL_PATH) in err
    assert Path(tokenizer.model_dir) == DEMO_MODEL_PATH
    messages = [{"role": "user", "content": CAPITAL}]
    assert generate(model, tokenizer, messages=messages, temperature=0).content == CAPITAL_ANSWER


def test_load_without_a_path_and_no_demo_model(monkeypatch, tmp_path, capsys):
    import qwen3_mlx.assets as assets
    from qwen3_mlx.errors import ConfigError
    from qwen3_mlx.loading import load

    monkeypatch.setattr(assets, "DEMO_MODEL_PATH", tmp_path / "demo")
    with pytest.raises(ConfigError, match="demo model is missing"):
        load()


def test_readme_lists_the_demo_prompts(demo_conversations):
    """Every user prompt the demo model was trained on (with or without /no_think, variants
    included) is in the README's list."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Prompts the demo model knows") :]
    section = section[: section.index("\n## ")]
    prompts = set()
    for record in demo_conversations.values():
        for fields in [record, *record.get("variants", [])]:
            for message in fields.get("messages", []):
                if message["role"] in ("user", "system") and "<tool_response>" not in str(
                    message["content"]
                ):
                    prompts.add(message["content"].removesuffix(" /no_think"))
    assert prompts
    missing = sorted(p for p in prompts if f"`{p}`" not in section)
    assert not missing, f"README misses the demo prompts {missing}"
    # A prompt trained without thinking only is marked so, and only such a prompt.
    thinks: dict[str, bool] = {}
    for record in demo_conversations.values():
        user = [m["content"] for m in record["messages"] if m["role"] == "user"][-1]
        prompt = user.removesuffix(" /no_think")
        thinks[prompt] = thinks.get(prompt, False) or bool(record.get("enable_thinking", True))
    lines = section.splitlines()
    for prompt, thinking in thinks.items():
        line = next(line for line in lines if f"`{prompt}`" in line)
        assert ("`--no-think` only" in line) == (not thinking), line


# -- 2. the generate CLI prints its stats line to stderr unless --quiet ------------------------


def generate_cli(*flags: str) -> subprocess.CompletedProcess:
    out = run(
        sys.executable, "-m", "qwen3_mlx.generate", "--prompt", CAPITAL, "--temp", "0", *flags
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n").endswith(CAPITAL_ANSWER)
    return out


def test_generate_prints_stats_by_default(demo_model_dir):
    err = generate_cli().stderr
    assert "built-in demo model" in err
    stats = [line for line in err.splitlines() if line.startswith("Prompt:")]
    assert len(stats) == 1, err
    for part in ("Prompt: ", " tokens/s | Generation: ", " tokens/s", "Peak memory: "):
        assert part in stats[0]
    assert "Generation: 0 tokens" not in stats[0]
    assert generate_cli("--verbose").stderr.count("tokens/s") == 2  # old flag: still accepted


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_generate_quiet_hides_stats(demo_model_dir, flag):
    err = generate_cli(flag).stderr
    assert "tokens/s" not in err and "Peak memory" not in err
    assert err.count("\n") == 1 and "built-in demo model" in err  # only the notice is left


# -- 3. --help states the defaults ------------------------------------------------------------


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each CLI's parser, captured from its main(["--help"])."""
    modules = {
        "generate": "qwen3_mlx.generate",
        "chat": "qwen3_mlx.chat",
        "serve": "qwen3_mlx.server.__main__",
        "convert": "qwen3_mlx.convert",
    }
    found = {}
    for name, module in modules.items():
        main = importlib.import_module(module).main
        original = argparse.ArgumentParser.parse_args

        def capture(self, *args, _name=name, **kwargs):
            found[_name] = self
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = capture
        try:
            with pytest.raises(SystemExit):
                main(["--help"])
        finally:
            argparse.ArgumentParser.parse_args = original
    return found


def help_text(parser: argparse.ArgumentParser, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "(default: …)"
    return one_line(parser.format_help())


def test_every_option_with_a_default_says_so(monkeypatch):
    for name, parser in parsers().items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if action.default not in (None, False, [], ""):
                assert "default" in (action.help or ""), f"{name} {action.option_strings}"


def test_help_states_max_tokens_default(monkeypatch):
    from qwen3_mlx.sampling import SamplingParams

    found = parsers()
    # The number the help prints is the one generation really uses when --max-tokens is unset.
    resolved = SamplingParams().resolve(thinking=True).max_tokens
    for name in ("generate", "chat"):
        text = help_text(found[name], monkeypatch)
        assert f"--max-tokens MAX_TOKENS generated tokens at most (default: {resolved}" in text
        assert "default: 0.6 thinking, 0.7 non-thinking" in text  # temperature
    serve = help_text(found["serve"], monkeypatch)
    assert "(default: no limit; a request that sets no max_tokens generates until" in serve


def test_help_states_server_port_and_host(monkeypatch):
    parser = parsers()["serve"]
    args = parser.parse_args([])
    assert (args.port, args.host) == (1234, "127.0.0.1")
    text = help_text(parser, monkeypatch)
    assert "--port PORT port to listen on (default: 1234)" in text
    assert "--host HOST address to bind (default: 127.0.0.1" in text


def test_help_states_convert_defaults(monkeypatch):
    text = help_text(parsers()["convert"], monkeypatch)
    for expected in ("(default: mlx_model)", "(default: 64)", "(default: 4,", "(default: 5GB)"):
        assert expected in text


# -- 4. usage lines name the command as typed ---------------------------------------------------

SUBCOMMANDS = ("generate", "chat", "serve", "convert", "bench")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_console_script_usage_names_the_subcommand(command):
    script = shutil.which("qwen3-mlx")
    if script is None:
        pytest.skip("the qwen3-mlx console script is not installed (pip install -e .)")
    out = run(script, command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: qwen3-mlx {command} "), out.stdout[:200]


def test_console_script_errors_name_the_subcommand():
    script = shutil.which("qwen3-mlx")
    if script is None:
        pytest.skip("the qwen3-mlx console script is not installed (pip install -e .)")
    out = run(script, "generate", "--no-such-flag")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: qwen3-mlx generate ")
    assert "qwen3-mlx generate: error: unrecognized arguments: --no-such-flag" in out.stderr


@pytest.mark.parametrize("module", ["qwen3_mlx.generate", "qwen3_mlx.chat", "qwen3_mlx.server"])
def test_module_usage_names_the_module(module):
    out = run(sys.executable, "-m", module, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module} ")


def test_dispatcher_restores_argv(monkeypatch):
    from qwen3_mlx import cli

    seen = {}

    def main(argv):  # a main() without prog=, like benchmarks.decode's
        seen["prog"] = argparse.ArgumentParser().prog
        return 0

    monkeypatch.setattr(sys, "argv", ["qwen3-mlx", "bench", "--x"])
    assert cli.call_main(main, ["--x"], "qwen3-mlx bench") == 0
    assert seen["prog"] == "qwen3-mlx bench"
    assert sys.argv == ["qwen3-mlx", "bench", "--x"]

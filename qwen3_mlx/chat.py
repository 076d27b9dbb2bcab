"""Multi-turn chat: the `Chat` class and the `python -m qwen3_mlx.chat` terminal REPL.

    from qwen3_mlx import load, Chat

    model, tokenizer = load("path/to/Qwen3-8B-4bit")
    chat = Chat(model, tokenizer, system="You are a helpful assistant.")
    reply = chat.send("How many r's in strawberries?")
    reply.thinking, reply.answer           # apart; the history keeps only the answer
    chat.send("Then how many in blueberries? /no_think")   # Qwen3's soft switch, per turn
    chat.send("And raspberries?", enable_thinking=False)   # the hard switch
    chat.reset()

Like Qwen3's published multi-turn example, the history is a list of messages rendered
with the chat template each turn. What it adds: the KV cache is kept across turns and
trimmed back to the prefix the new prompt shares with it (`cache.PromptCache`), so a
turn prefills only its new tokens — `reply.stats.prefill_tokens` says how many. (The
template drops earlier turns' reasoning, so the thinking tokens of the last reply are
cut off the cache before the next turn.)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .cache import PromptCache, make_cache
from .errors import GenerationError, Qwen3MLXError
from .generation import (
    DEFAULT_PREFILL_STEP_SIZE,
    GenerationResponse,
    GenerationStats,
    start_request,
    stream_sequence,
)
from .generation.speculative import DEFAULT_DRAFT_TOKENS, drafter_for, speculative_sequence
from .parsing import ToolCall
from .sampling import SamplingParams
from .terminal import (
    ReplyPrinter,
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    load_for_cli,
    run_cli,
    sampling_from_args,
    speculative_from_args,
)


@dataclass
class ChatReply:
    thinking: str
    answer: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def reasoning(self) -> str:
        return self.thinking

    @property
    def content(self) -> str:
        return self.answer


class Chat:
    """A conversation with one model; keeps history and KV cache between turns."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: str | None = None,
        tools: list[Any] | None = None,
        enable_thinking: bool = True,
        thinking_budget: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        max_kv_size: int | None = None,
        params: SamplingParams | None = None,
        draft_model: Any = None,
        num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        prompt_lookup: int | None = None,
        **sampling: Any,
    ):
        """`draft_model` / `prompt_lookup`: speculative decoding, as `stream_generate` (the
        draft keeps its own cache across turns)."""
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.tools = tools
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.params = params if params is not None else SamplingParams.from_kwargs(**sampling)
        self.cache = PromptCache(make_cache(model, kv_bits, kv_group_size, max_kv_size))
        self.drafter = drafter_for(model, draft_model, prompt_lookup)
        self.num_draft_tokens = num_draft_tokens
        self.history: list[dict[str, Any]] = []
        self.last_reply: ChatReply | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays; the cache keeps its prefix)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.last_reply = None

    def add_tool_result(
        self, content: str, tool_call_id: str | None = None, name: str | None = None
    ):
        """Append a tool's result; then `send(None)` lets the model continue."""
        message = {"role": "tool", "content": content}
        if tool_call_id:
            message["tool_call_id"] = tool_call_id
        if name:
            message["name"] = name
        self.history.append(message)

    def send(self, text: str | None, **options: Any) -> ChatReply:
        """Send a user message (None: continue after tool results); return the reply."""
        for _ in self.stream(text, **options):
            pass
        return self.last_reply

    def stream(
        self,
        text: str | None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        params: SamplingParams | None = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        **sampling: Any,
    ) -> Iterator[GenerationResponse]:
        """Like `send`, one response per token. The turn enters the history once the reply
        is complete; a reply abandoned midway (generator closed) leaves no trace."""
        messages = list(self.history)
        if text is not None:
            messages.append({"role": "user", "content": text})
        if params is None:
            params = self.params.with_overrides(**sampling)
        seq, _ = start_request(
            self.model,
            self.tokenizer,
            messages=messages,
            tools=self.tools,
            enable_thinking=self.enable_thinking if enable_thinking is None else enable_thinking,
            thinking_budget=self.thinking_budget if thinking_budget is None else thinking_budget,
            params=params,
            cache=self.cache,
            parse_tools=bool(self.tools),
        )
        stats = GenerationStats()
        if self.drafter is None:
            responses = stream_sequence(
                self.model, seq, self.cache, prefill_step_size=prefill_step_size
            )
        else:
            responses = speculative_sequence(
                self.model,
                seq,
                self.cache,
                self.drafter,
                self.num_draft_tokens,
                prefill_step_size=prefill_step_size,
            )
        for response in responses:
            stats = response.stats
            yield response

        assistant: dict[str, Any] = {"role": "assistant", "content": seq.content}
        if seq.reasoning:
            assistant["reasoning_content"] = seq.reasoning
        if seq.tool_calls:
            assistant["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in seq.tool_calls
            ]
        self.history = [*messages, assistant]
        self.last_reply = ChatReply(
            seq.reasoning, seq.content, list(seq.tool_calls), seq.finish_reason, stats
        )


# -- the terminal REPL ---------------------------------------------------------------------

HELP = """Available commands:
  /think        think before answering (default)
  /no_think     answer directly
  /clear        forget the conversation
  /set NAME V   set a parameter for the next replies: temperature, top_p, top_k, min_p,
                max_tokens, seed, presence_penalty, repetition_penalty, thinking_budget, system
  /exit, /bye   leave (or Ctrl-D)
  /?, /help     this help
Ctrl-C stops a reply without leaving the chat."""


class _Interrupt:
    """Turns Ctrl-C during a reply into a flag the loop checks between tokens, so the
    reply stops cleanly (the KV cache stays consistent) and the chat goes on."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self):
        self.event.clear()
        self._previous = signal.signal(signal.SIGINT, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


def repl(chat: Chat, verbose: bool = False, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print("Send a message (/? for help)", file=stdout, flush=True)
    interrupt = _Interrupt()
    while True:
        try:
            line = input(">>> ") if stdin is sys.stdin else _read_line(stdin, stdout)
        except EOFError:
            print(file=stdout)
            return 0
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=stdout, flush=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            command = command.lower()
            if command in ("/exit", "/bye", "/quit"):
                return 0
            if command in ("/?", "/help"):
                print(HELP, file=stdout)
            elif command == "/think":
                chat.enable_thinking = True
                print("Set 'think' mode.", file=stdout)
            elif command == "/no_think":
                chat.enable_thinking = False
                print("Set 'nothink' mode.", file=stdout)
            elif command == "/clear":
                chat.reset()
                print("Cleared session context.", file=stdout)
            elif command == "/set":
                print(_set_parameter(chat, argument), file=stdout)
            else:
                print(f"Unknown command '{line}'. Type /? for help", file=stdout)
            stdout.flush()
            continue

        printer = ReplyPrinter(stdout)
        stats = None
        with interrupt as stopped:
            replies = chat.stream(line)
            try:
                for response in replies:
                    printer.feed(response)
                    stats = response.stats
                    if stopped.is_set():
                        break
            except Qwen3MLXError as e:  # e.g. the conversation outgrew the context
                printer.close()
                print(f"error: {e}", file=stdout, flush=True)
                continue
            finally:
                replies.close()
        printer.close()
        if stopped.is_set():
            print("(stopped)", file=stdout)
        elif verbose and stats is not None:
            print(stats.summary(), file=sys.stderr)
        print(file=stdout, flush=True)


def _set_parameter(chat: Chat, argument: str) -> str:
    name, _, raw = argument.strip().partition(" ")
    raw = raw.strip()
    if not name or not raw:
        return "Usage: /set NAME VALUE (see /?)"
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    try:
        if name == "system":
            chat.system = raw
            chat.reset()
            return "Set system message (conversation cleared)."
        if name == "thinking_budget":
            if value is not None and (not isinstance(value, int) or value < 0):
                raise GenerationError(f"thinking_budget: expected an integer >= 0, got {raw}")
            chat.thinking_budget = value
        else:
            chat.params = chat.params.with_overrides(**{name: value}).validate()
    except Qwen3MLXError as e:
        return f"error: {e}"
    return f"Set parameter '{name}' to '{raw}'"


def _read_line(stdin, stdout) -> str:
    stdout.write(">>> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def main(argv: list[str] | None = None, prog: str = "python -m qwen3_mlx.chat") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with a Qwen3 model in the terminal."
    )
    add_model_arguments(parser)
    parser.add_argument("--system", "-s", help="system prompt (default: none)")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print speed and memory stats after each reply (default: off)",
    )
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        params = sampling_from_args(args)
        model, tokenizer = load_for_cli(args)
        chat = Chat(
            model,
            tokenizer,
            system=args.system,
            enable_thinking=not args.no_think,
            thinking_budget=args.thinking_budget,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_size=args.max_kv_size,
            params=params,
            **speculative_from_args(args),
        )
        return repl(chat, verbose=args.verbose)

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())

"""Ollama's replies: `/api/chat` and `/api/generate` records, the model listings (`/api/tags`,
`/api/ps`, `/api/show`) and its errors.

A reply is a run of records, one JSON object per line (`application/x-ndjson`) when streamed:
each says what a step added (`message.content` / `message.thinking` for chat, `response` /
`thinking` for generate), a tool call comes whole in a record of its own (`arguments` an
object), and the last record says `done: true` with `done_reason` and the timings in
nanoseconds. Not streamed, the reply is that last record holding the whole message. Both are
built from the same steps, so they agree.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from ..catalog import CatalogEntry
from ..jobs import EngineBusy, Finished
from ..models import LoadedModel
from ..prepare import ApiError
from ..protocol.ollama import (
    OllamaCall,
    OllamaCallFunction,
    OllamaChatRecord,
    OllamaGenerateRecord,
    OllamaModelDetails,
    OllamaModelEntry,
    OllamaRecord,
    OllamaReplyMessage,
    OllamaRunningModel,
    OllamaShowResponse,
)
from .common import dump, finish_reason

NDJSON = "application/x-ndjson"


def line(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def error_line(e: ApiError | EngineBusy) -> str:
    """An error after the stream began: a record holding only `error` (the client raises it)."""
    return line({"error": str(e) if isinstance(e, EngineBusy) else e.message})


def nanoseconds(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


class Records:
    """`step` per step output, then `finish`: the lines to stream when `streaming`, and the
    whole reply (`reply`). `chat`: `/api/chat`'s records (a `message`), else `/api/generate`'s
    (`response`, `thinking`). `name`: the model as the request named it (Ollama echoes it).
    `raw` (a raw or templated prompt): the text as the model wrote it, thinking tags and all."""

    def __init__(
        self, *, name: str, chat: bool, streaming: bool, started: float, raw=False, load=0.0
    ):
        self.name, self.chat, self.streaming, self.started = name, chat, streaming, started
        self.raw = raw
        self.load_seconds = load  # the load this request waited for (0: the model was loaded)
        self.thinking: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}  # index → id, name, arguments JSON so far
        self.sent = 0  # the calls streamed so far (each once whole)
        self.final: OllamaRecord | None = None

    def _record(self, content: str = "", thinking: str = "", calls=None, **done) -> OllamaRecord:
        common = {"model": self.name, "created_at": timestamp(), **done}
        if self.chat:
            message = OllamaReplyMessage(
                content=content, thinking=thinking or None, tool_calls=calls or None
            )
            return OllamaChatRecord(message=message, **common)
        return OllamaGenerateRecord(response=content, thinking=thinking or None, **common)

    def _call(self, index: int) -> OllamaCall:
        call = self.calls[index]
        arguments = json.loads(call["arguments"] or "{}")  # the parser emits only valid JSON
        function = OllamaCallFunction(index=index, name=call["name"], arguments=arguments)
        return OllamaCall(id=call["id"], function=function)

    def _send_calls(self, up_to: int) -> list[str]:
        """Records for the calls before `up_to` not sent yet (a call is whole once the next
        one starts, or the reply ends)."""
        lines = []
        while self.sent < up_to and self.streaming:
            lines.append(line(dump(self._record(calls=[self._call(self.sent)]))))
            self.sent += 1
        return lines

    def step(self, step) -> list[str]:
        lines: list[str] = []
        reasoning, content = ("", step.text) if self.raw else (step.reasoning, step.content)
        if reasoning or content:
            self.thinking.append(reasoning)
            self.content.append(content)
            if self.streaming:
                record = self._record(content=content, thinking=reasoning)
                lines.append(line(dump(record)))
        for d in step.tool_calls:
            if d.index not in self.calls:
                lines += self._send_calls(d.index)
                self.calls[d.index] = {"id": d.id or "", "name": d.name or "", "arguments": ""}
            self.calls[d.index]["arguments"] += d.arguments_delta
        return lines

    def finish(self, finished: Finished) -> list[str]:
        """The closing lines; afterwards `reply` is the whole reply."""
        lines = self._send_calls(len(self.calls))
        done = {
            "done": True,
            "done_reason": "length" if finish_reason(finished) == "length" else "stop",
            "total_duration": nanoseconds(time.perf_counter() - self.started),
            "load_duration": nanoseconds(self.load_seconds),
            "prompt_eval_count": finished.prompt_tokens,
            "prompt_eval_duration": nanoseconds(finished.time_to_first_token),
            "eval_count": finished.completion_tokens,
            "eval_duration": nanoseconds(finished.generation_time),
        }
        calls = [self._call(i) for i in sorted(self.calls)]
        self.final = self._record(
            content="".join(self.content), thinking="".join(self.thinking), calls=calls, **done
        )
        if self.streaming:  # the text came in the records before: the last one says the rest
            lines.append(line(dump(self._record(**done))))
        return lines

    def reply(self) -> dict[str, Any]:
        return dump(self.final)


def loaded(name: str, *, chat: bool, reason: str = "load") -> dict[str, Any]:
    """The reply to a request with nothing to generate (Ollama's way to load a model, or with
    `keep_alive: 0` to unload it: `reason` "unload")."""
    done = {"model": name, "created_at": timestamp(), "done": True, "done_reason": reason}
    record = OllamaChatRecord(**done) if chat else OllamaGenerateRecord(**done)
    return dump(record)


# -- the models ----------------------------------------------------------------------------------


Listed = LoadedModel | CatalogEntry  # /api/tags lists the models not loaded too


def ollama_name(model: Listed) -> str:
    """The name Ollama's listings give: `name:tag`, the tag `latest` unless the id has one."""
    return model.id if ":" in model.id.rsplit("/", 1)[-1] else model.id + ":latest"


def _files(model: Listed) -> list:
    return sorted(p for p in model.path.iterdir() if p.is_file())


def disk_size(model: Listed) -> int:
    return sum(p.stat().st_size for p in _files(model) if p.suffix == ".safetensors")


def digest(model: Listed) -> str:
    """A stable id of the checkpoint: its files' names, sizes and times (hashing the weights
    themselves would read gigabytes per listing)."""
    h = hashlib.sha256()
    for p in _files(model):
        stat = p.stat()
        h.update(f"{p.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def modified_at(model: Listed) -> str:
    return timestamp(max(p.stat().st_mtime for p in _files(model)))


def parameter_count(model: LoadedModel) -> int:
    """Weights as the model was trained (a quantized matrix counts its unpacked elements);
    arrays' sizes are metadata, so nothing is evaluated off the engine thread."""
    total = 0
    for _, module in model.model.named_modules():
        bits = getattr(module, "bits", None)
        for key, value in module.items():
            if key.startswith("_") or not hasattr(value, "size") or not hasattr(value, "dtype"):
                continue
            if bits and key in ("scales", "biases"):
                continue  # quantization's own arrays, not weights
            total += value.size * 32 // bits if bits and key == "weight" else value.size
    return total


def human_count(n: int) -> str:
    """Ollama's `parameter_size`: 7.6B, 494.03M, 12.50K."""
    for unit, scale, digits in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 2)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


def details(model: Listed) -> OllamaModelDetails:
    loaded = isinstance(model, LoadedModel)
    count = parameter_count(model) if loaded else model.parameter_count
    return OllamaModelDetails(
        family=model.arch,
        families=[model.arch],
        parameter_size=human_count(count),
        quantization_level=model.quantization,
    )


def entry(model: Listed) -> OllamaModelEntry:
    name = ollama_name(model)
    return OllamaModelEntry(
        name=name,
        model=name,
        modified_at=modified_at(model),
        size=disk_size(model),
        digest=digest(model),
        details=details(model),
    )


# A model with no TTL stays loaded: Ollama's "never expires" is a time far ahead.
NEVER = "2318-01-01T00:00:00Z"


def running(model: LoadedModel, on_gpu: bool, expires: float | None) -> OllamaRunningModel:
    """`expires`: when (time.time()) its TTL unloads it if no request comes; None: never."""
    card = entry(model)
    size = model.weights_bytes
    return OllamaRunningModel(
        name=card.name,
        model=card.model,
        size=size,
        digest=card.digest,
        details=card.details,
        expires_at=NEVER if expires is None else timestamp(expires),
        size_vram=size if on_gpu else 0,
        context_length=model.context_length,
    )


def capabilities(model: LoadedModel) -> list[str]:
    return ["completion", "tools", "thinking"] if model.kind == "llm" else ["embedding"]


# Ollama's option names for generation_config.json's keys (what /api/show's `parameters` lists).
PARAMETERS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}


def show(model: LoadedModel) -> OllamaShowResponse:
    args = model.model.args
    arch = model.arch
    info = {
        "general.architecture": arch,
        "general.parameter_count": parameter_count(model),
        f"{arch}.context_length": model.context_length,
        f"{arch}.embedding_length": args.hidden_size,
        f"{arch}.block_count": args.num_hidden_layers,
        f"{arch}.attention.head_count": args.num_attention_heads,
        f"{arch}.attention.head_count_kv": args.num_key_value_heads,
        f"{arch}.vocab_size": args.vocab_size,
    }
    parameters = [
        f"{ours:<30} {model.generation_config[theirs]}"
        for theirs, ours in PARAMETERS.items()
        if theirs in model.generation_config
    ]
    license_file = next((p for p in _files(model) if p.stem.upper() == "LICENSE"), None)
    return OllamaShowResponse(
        license=license_file.read_text(errors="replace") if license_file else "",
        modelfile=f"# Served by qwen3-mlx\nFROM {model.path}\n",
        parameters="\n".join(parameters),
        template=model.tokenizer.chat_template or "",
        details=details(model),
        model_info=info,
        capabilities=capabilities(model),
        modified_at=modified_at(model),
    )

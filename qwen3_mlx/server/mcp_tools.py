"""The MCP servers of `--mcp-config`: started with the server, their tools listed, called for
the tool loop (mcp_loop.py), shut down with the server.

The `mcp` SDK's sessions are asyncio (anyio) objects whose context managers must be entered and
left by one task, so each server lives in one long task on a loop thread of its own: the HTTP
loop never waits on an MCP server's start-up or shutdown, and the engine thread (the only one
touching MLX) never sees them. Requests reach a session through `run_coroutine_threadsafe`.

A server that can't start is a `ConfigError` naming the config file, the server and the cause
(the last line it wrote to stderr when it exited): the CLI prints one line and exits 1. Once
running, anything a call meets (the tool's error, a timeout, a server that died) becomes an
error result for the model, never an exception for the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from ..errors import ConfigError
from .protocol.mcp import (
    McpConfigFile,
    McpServerConfig,
    McpServerInfo,
    McpServerList,
    McpToolInfo,
)

log = logging.getLogger("qwen3_mlx.server.mcp")

START_TIMEOUT = 60.0  # seconds for a server to start and list its tools (uvx may download)
STOP_TIMEOUT = 5.0


def read_config(path: Path) -> dict[str, McpServerConfig]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--mcp-config {path}: {e.strerror or e}") from None
    try:
        return McpConfigFile.model_validate_json(text).mcpServers
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"--mcp-config {path}: {where}: {message}") from None


@dataclass
class ToolResult:
    """What the model is told about one call: the text, and whether it is an error."""

    content: str
    is_error: bool = False


@dataclass
class McpTool:
    server: str
    name: str
    description: str | None
    input_schema: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as chat's `tools` takes it: a function whose parameters are the input
        schema as the server lists it (its keys in its order: the prompt is what the model saw
        in training)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.input_schema
        return {"type": "function", "function": function}


@dataclass
class McpServer:
    name: str
    config: McpServerConfig
    state: str = "starting"
    error: str | None = None
    tools: list[McpTool] = field(default_factory=list)
    session: Any = None
    stop: asyncio.Event | None = None
    stderr: Any = None  # the process's stderr (a temp file): its last line explains a failure

    @property
    def transport(self) -> str:
        return "stdio" if self.config.command is not None else "streamable_http"

    def last_stderr_line(self) -> str | None:
        if self.stderr is None:
            return None
        try:
            self.stderr.flush()
            self.stderr.seek(0)
            lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        except (OSError, ValueError):
            return None
        return lines[-1][:300] if lines else None


def _describe(e: BaseException) -> str:
    """An exception (anyio wraps task failures in groups) as one readable phrase."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    if isinstance(e, FileNotFoundError):
        return f"command not found: {e.filename or e}"
    if isinstance(e, TimeoutError):
        return "no answer"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


class McpHub:
    """The configured servers, on their loop thread. `start` then `wait_ready` (at start-up),
    `call` (from the HTTP loop), `close` (at shutdown)."""

    def __init__(
        self, config_path: Path, servers: dict[str, McpServerConfig], timeout: float, max_calls: int
    ):
        self.config_path, self.timeout, self.max_calls = config_path, timeout, max_calls
        self.servers = {name: McpServer(name, cfg) for name, cfg in servers.items()}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="qwen3-mlx-mcp", daemon=True
        )
        self.tasks: list[Future] = []
        self.closed = False

    @classmethod
    def from_file(cls, path: Path, timeout: float, max_calls: int) -> McpHub:
        return cls(path, read_config(path), timeout, max_calls)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        for server in self.servers.values():
            ready: Future = Future()
            self.tasks.append(ready)
            asyncio.run_coroutine_threadsafe(self._run(server, ready), self.loop)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until every server listed its tools; the first that failed raises (after
        every server is stopped)."""
        try:
            for server, ready in zip(self.servers.values(), self.tasks, strict=True):
                try:
                    ready.result(timeout)
                except TimeoutError:
                    server.state, server.error = "failed", f"not ready after {timeout:.0f}s"
                if server.state != "ready":
                    raise ConfigError(
                        f"--mcp-config {self.config_path}: MCP server '{server.name}' did not "
                        f"start: {server.error}"
                    )
        except BaseException:
            self.close()
            raise
        for server in self.servers.values():
            log.info(
                "MCP server '%s': %d tools (%s)",
                server.name,
                len(server.tools),
                ", ".join(t.name for t in server.tools),
            )

    async def _run(self, server: McpServer, ready: Future) -> None:
        server.stop = asyncio.Event()
        if server.config.command is not None:
            # Kept past the session, for its last line when the process fails to start.
            server.stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        try:
            async with AsyncExitStack() as stack:
                session = await self._connect(server, stack)
                # anyio's deadline, not asyncio.wait_for (which runs its coroutine in another
                # task), and only around the handshake: the SDK's contexts (their task groups)
                # must be left by the task and in the scope that entered them.
                with anyio.fail_after(START_TIMEOUT):
                    await self._handshake(server, session)
                server.session, server.state = session, "ready"
                ready.set_result(None)
                await server.stop.wait()
        except BaseException as e:  # noqa: BLE001 - whatever ended it is the server's state
            if server.state == "starting":
                cause = _describe(e)
                tail = server.last_stderr_line()
                if tail and tail not in cause:
                    cause = f"{cause} (its last output: {tail})"
                server.state, server.error = "failed", cause
            elif not server.stop.is_set():
                server.state, server.error = "failed", f"stopped: {_describe(e)}"
                log.warning("MCP server '%s' stopped: %s", server.name, server.error)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            server.session = None
            if server.state == "ready":
                server.state = "stopped"
            if not ready.done():
                ready.set_result(None)
            if server.stderr is not None and server.state != "failed":
                server.stderr.close()

    async def _connect(self, server: McpServer, stack: AsyncExitStack):
        from mcp import ClientSession, StdioServerParameters, stdio_client

        cfg = server.config
        if cfg.command is not None:
            params = StdioServerParameters(
                command=cfg.command,
                args=cfg.args,
                # The SDK passes a safe subset of the environment when given none: keep PATH
                # and the rest, as the user's shell would, plus the entry's own.
                env={**os.environ, **(cfg.env or {})},
                cwd=cfg.cwd,
            )
            read, write = await stack.enter_async_context(
                stdio_client(params, errlog=server.stderr)
            )
        else:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            client = await stack.enter_async_context(
                httpx2.AsyncClient(headers=cfg.headers or {}, timeout=httpx2.Timeout(30.0))
            )
            read, write, *_ = await stack.enter_async_context(
                streamable_http_client(cfg.url, http_client=client)
            )
        return await stack.enter_async_context(ClientSession(read, write))

    async def _handshake(self, server: McpServer, session) -> None:
        from mcp.types import PaginatedRequestParams

        await session.initialize()
        tools, cursor = [], None
        while True:
            listed = await session.list_tools(
                params=PaginatedRequestParams(cursor=cursor) if cursor else None
            )
            tools += listed.tools
            cursor = getattr(listed, "next_cursor", None) or getattr(listed, "nextCursor", None)
            if not cursor:
                break
        server.tools = [
            McpTool(server.name, t.name, t.description, _input_schema(t)) for t in tools
        ]

    def close(self) -> None:
        """Stop every server (their processes end with their sessions) and the loop thread."""
        if self.closed or not self.thread.is_alive():
            self.closed = True
            return
        self.closed = True

        def stop_all():
            for server in self.servers.values():
                if server.stop is not None:
                    server.stop.set()

        self.loop.call_soon_threadsafe(stop_all)
        for ready in self.tasks:
            ready.result(STOP_TIMEOUT) if not ready.done() else None

        async def drain():
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.wait(pending, timeout=STOP_TIMEOUT)

        try:
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(STOP_TIMEOUT + 1)
        except Exception:  # noqa: BLE001 - shutting down: a server that won't stop is left
            log.warning("MCP servers did not all stop within %ss", STOP_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT)

    # -- what requests use ------------------------------------------------------------------

    def listing(self) -> McpServerList:
        return McpServerList(
            config=str(self.config_path),
            timeout_seconds=self.timeout,
            max_calls=self.max_calls,
            servers=[
                McpServerInfo(
                    name=s.name,
                    transport=s.transport,
                    state=s.state,
                    error=s.error,
                    tools=[
                        McpToolInfo(
                            name=t.name, description=t.description, input_schema=t.input_schema
                        )
                        for t in s.tools
                    ],
                )
                for s in self.servers.values()
            ],
        )

    async def call(self, tool: McpTool, arguments: str) -> ToolResult:
        """Run `tool` (from the HTTP loop); every failure is an error result, never raised."""
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolResult(f"error: the arguments are not JSON ({e})", True)
        if not isinstance(args, dict):
            return ToolResult("error: the arguments must be a JSON object", True)
        future = asyncio.run_coroutine_threadsafe(self._call(tool, args), self.loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client left: the call need not finish
            raise

    async def _call(self, tool: McpTool, args: dict[str, Any]) -> ToolResult:
        server = self.servers[tool.server]
        if server.session is None or server.state != "ready":
            why = f": {server.error}" if server.error else ""
            return ToolResult(f"error: MCP server '{server.name}' is not running{why}", True)
        try:
            result = await asyncio.wait_for(
                server.session.call_tool(tool.name, args), timeout=self.timeout
            )
        except TimeoutError:
            return ToolResult(
                f"error: tool '{tool.name}' timed out after {self.timeout:g}s (--mcp-timeout)",
                True,
            )
        except Exception as e:  # noqa: BLE001 - a server's failure is the model's to read
            cause = _describe(e)
            if _connection_lost(e) and server.state == "ready":
                tail = server.last_stderr_line()
                server.state = "failed"
                server.error = "it exited" + (f" (its last output: {tail})" if tail else "")
                log.warning("MCP server '%s' is gone: %s", server.name, server.error)
            return ToolResult(f"error: tool '{tool.name}' failed: {cause}", True)
        return ToolResult(_text_of(result), bool(getattr(result, "is_error", False)))


def _connection_lost(e: BaseException) -> bool:
    """Whether a call failed because the server's side of the session is gone (its process
    exited): the SDK reports it as a closed connection or stream."""
    if isinstance(e, anyio.ClosedResourceError | anyio.BrokenResourceError | EOFError):
        return True
    return "connection closed" in str(e).lower()


def _input_schema(tool) -> dict[str, Any]:
    schema = getattr(tool, "input_schema", None)
    if schema is None:
        schema = getattr(tool, "inputSchema", None)
    return dict(schema or {"type": "object", "properties": {}})


def _text_of(result) -> str:
    """A call's result as the tool message's text: its text blocks; structured content where
    there is no text; other blocks (images, audio) named, as this model reads only text."""
    parts = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(getattr(block, "resource", None), "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind} content omitted]")
    if not parts:
        structured = getattr(result, "structured_content", None)
        if structured is None:
            structured = getattr(result, "structuredContent", None)
        if structured is not None:
            return json.dumps(structured, ensure_ascii=False)
    return "\n".join(parts)

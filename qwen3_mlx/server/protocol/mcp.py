"""MCP tools the server runs itself (--mcp-config): the config file, a request's selection,
the executed calls a reply reports, and `GET /api/v1/mcp`.

Imported from this module: these names belong to the MCP feature alone.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import RequestPart, Schema

# -- the config file (LM Studio's and Cursor's mcp.json) ---------------------------------------


class McpServerConfig(Schema):
    # Other apps' mcp.json entries carry their own keys (Cursor's "type", "disabled"…): kept
    # out of the way, not refused.
    model_config = ConfigDict(extra="ignore")

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None  # the streamable HTTP transport
    headers: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_transport(self):
        if (self.command is None) == (self.url is None):
            raise ValueError('give "command" (a local process) or "url" (streamable HTTP)')
        return self


class McpConfigFile(Schema):
    mcpServers: dict[str, McpServerConfig]


# -- a request's selection ---------------------------------------------------------------------


class McpSelection(RequestPart):
    servers: list[str] | None = Field(
        None,
        description="Names of --mcp-config's servers whose tools the model gets (default: all).",
    )
    tools: list[str] | None = Field(
        None,
        description="Allow-list of tool names among those servers' tools (default: all).",
    )


MCP_DESCRIPTION = (
    "Tools of the MCP servers this server started (--mcp-config), run by the server: `true` "
    "offers every tool, an object narrows them (`servers`, `tools`). The model's calls of them "
    "are executed and answered with `tool` messages until it replies without one, up to "
    "--mcp-max-calls calls; a stream carries each result as a chunk whose `delta` has `role: "
    '"tool"`, `tool_call_id`, `name`, `content` and `is_error`; a whole reply lists them in '
    "`choices[0].message.mcp_calls`. One choice only (`n` 1)."
)


# -- executed calls ------------------------------------------------------------------------------


class McpCall(Schema):
    """One tool call the server ran, and what came of it (an error is `is_error`, its message
    the content: the model got the same text)."""

    id: str
    server: str
    name: str
    arguments: str
    content: str
    is_error: bool = False


class ToolResultDelta(Schema):
    """A streamed chunk's delta carrying the result of a tool call the server ran."""

    role: Literal["tool"] = "tool"
    tool_call_id: str
    name: str
    content: str
    is_error: bool = False


# -- GET /api/v1/mcp ------------------------------------------------------------------------------


class McpToolInfo(Schema):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class McpServerInfo(Schema):
    name: str
    transport: Literal["stdio", "streamable_http"]
    state: Literal["starting", "ready", "failed", "stopped"]
    error: str | None = None
    tools: list[McpToolInfo]


class McpServerList(Schema):
    config: str | None = Field(None, description="The --mcp-config file (null: none given).")
    timeout_seconds: float | None = None
    max_calls: int | None = None
    servers: list[McpServerInfo]

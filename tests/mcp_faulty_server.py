"""A local MCP server (the `mcp` SDK's MCPServer, FastMCP before 2.0) whose one tool misbehaves,
for tests/test_server_mcp.py: `python tests/mcp_faulty_server.py MODE`.

Its tool is mcp-server-time's `get_current_time` in name, description and input schema (the
same SDK derives the same schema from the same signature), so the demo model, trained on that
tool's prompt, calls it. MODE: `raise` (the tool raises), `sleep` (it answers after 30 s, past
any test's --mcp-timeout), `exit` (the process exits mid-call: a server that died), `crash`
(it exits before the MCP handshake: a server that won't start).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

from pydantic import Field

MODE = sys.argv[1] if len(sys.argv) > 1 else "raise"

if MODE == "crash":
    print("faulty server: refusing to start (crash mode)", file=sys.stderr, flush=True)
    sys.exit(3)

from mcp.server.mcpserver import MCPServer  # noqa: E402

server = MCPServer("faulty")


@server.tool(name="get_current_time", description="Get current time in a specific timezone")
def get_current_time(
    timezone: Annotated[
        str,
        Field(
            description="IANA timezone name (e.g., 'America/New_York', 'Europe/London'). Use "
            "'Etc/UTC' as local timezone if no timezone provided by the user."
        ),
    ],
) -> str:
    if MODE == "sleep":
        time.sleep(30)
        return "too late"
    if MODE == "exit":
        os._exit(5)
    raise RuntimeError(f"the clock of {timezone} is broken")


if __name__ == "__main__":
    import anyio

    anyio.run(server.run_stdio_async)

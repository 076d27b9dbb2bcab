"""The chat page at `/` (`--no-ui` turns it off): plain files from ui/, no build step, no CDN.

The page talks to the server's own `/v1` API from the browser, so it needs nothing here but the
files; they are served without the API key (`PATHS`: the page asks for the key itself).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

UI_DIR = Path(__file__).with_name("ui")
ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
PATHS = ("/", *(f"/ui/{name}" for name in ASSETS))

# Replies are rendered as HTML (escaped first); the policy keeps any markup that slipped through
# from running scripts or loading anything from elsewhere.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated (ETag): an upgraded server's page is seen at once
}


def register_ui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def chat_page_asset(name: str):
        if name not in ASSETS:
            raise HTTPException(404)
        return FileResponse(UI_DIR / name, media_type=ASSETS[name], headers=HEADERS)

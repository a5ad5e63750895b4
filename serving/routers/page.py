"""The chat page for end users at ``/``: plain HTML, CSS and JS shipped inside the liveloop package.

The page itself is public; everything it does goes through the API with the key the user enters, so the
API's own authentication applies.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = files("liveloop") / "static"

router = APIRouter(tags=["page"], include_in_schema=False)


@router.get("/")
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def static_files() -> StaticFiles:
    """The page's scripts and styles, for ``app.mount("/static", …)``."""
    return StaticFiles(packages=[("liveloop", "static")])

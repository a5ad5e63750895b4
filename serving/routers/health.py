from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from sqlalchemy import text

from serving.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    """The process can serve: its engine thread runs. No dependency is checked (a restart would not fix a
    database outage), but an engine that died stays dead until the process is restarted."""
    if not request.app.state.engine.is_running():
        raise Unavailable("the generation engine is not running")
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict:
    """Ready to serve: the model is loaded and generating, and the database answers."""
    state = request.app.state
    if not state.engine.is_running():
        raise Unavailable("the generation engine is not running")
    try:
        await asyncio.to_thread(_ping, state.db_engine)
    except Exception as exc:
        raise Unavailable(f"the database is not reachable: {type(exc).__name__}") from exc
    adapters = state.adapters
    return {"status": "ready", "model": adapters.base_model_id, "live_version": adapters.live,
            "live_since": adapters.live_since, "canary_version": adapters.canary,
            "loaded_versions": state.engine.loaded_adapters(), "refused_versions": adapters.refused}


def _ping(db_engine) -> None:
    with db_engine.connect() as connection:
        connection.execute(text("SELECT 1"))

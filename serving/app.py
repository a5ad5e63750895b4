"""The API process: ``create_app(settings)`` builds everything once at start-up and keeps it on app.state."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from feedback.service import FeedbackLog
from liveloop.db import make_sessionmaker, open_database
from liveloop.model import load_base_model
from liveloop.registry import open_registry
from liveloop.settings import Settings
from serving.api_keys import ApiKeys
from serving.chat import ChatService
from serving.engine import Engine
from serving.errors import ClientGone, DeclaredBodyLimit, DrainUnreadBody, install_error_handlers
from serving.hotswap import AdapterWatcher
from serving.observability import RequestObservability, metrics_endpoint
from serving.routers import admin, chat, health, models, page
from serving.routers import feedback as feedback_routes
from serving.routing import AdapterSet
from serving.store import CompletionStore

log = logging.getLogger(__name__)

# A refused body up to this multiple of the limit is read (and thrown away) so its client can read the 413.
_DRAIN_BODIES_UP_TO = 16


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="liveloop", version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    app.state.api_keys = ApiKeys(settings.api_keys)
    install_error_handlers(app)
    # the last added runs first
    app.add_middleware(DeclaredBodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(DrainUnreadBody, max_bytes=_DRAIN_BODIES_UP_TO * settings.max_body_bytes)
    app.add_middleware(ClientGone)
    # routes are matched in order: the busiest endpoints first
    for router in (feedback_routes.router, chat.router, models.router, health.router, admin.router, page.router):
        app.include_router(router, max_body_size=settings.max_body_bytes)
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    app.mount("/static", page.static_files())
    app.add_middleware(RequestObservability)  # outermost: it sees every answer, the error handlers' too
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    db_engine = open_database(settings)
    base = load_base_model(settings)
    engine = Engine(base, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)
    adapters = AdapterSet(base_model_id=base.model_id, alias=settings.model_alias,
                          canary_fraction=settings.canary_fraction)
    sessions = make_sessionmaker(db_engine)
    state = app.state
    state.db_engine, state.sessions, state.engine, state.adapters = db_engine, sessions, engine, adapters
    state.registry = open_registry(sessions, settings)
    state.chat = ChatService(engine=engine, tokenizer=base.tokenizer, context_length=base.context_length,
                             adapters=adapters, store=CompletionStore(sessions), settings=settings)
    state.feedback = FeedbackLog.start(sessions, settings)  # group-commit writer and outbox relay
    engine.start()
    state.adapter_watcher = AdapterWatcher(registry=state.registry, engine=engine, adapters=adapters,
                                           settings=settings)
    await asyncio.to_thread(state.adapter_watcher.sync)  # ready only once the live version is loaded
    state.adapter_watcher.start()
    # The model, torch and transformers leave millions of long-lived objects; a full collection scanning them all
    # paused every request for ~0.3 s (the p99 of feedback ingestion). Frozen, collections see only new objects.
    gc.collect()
    gc.freeze()
    log.info("serving %s (%s on %s)", base.model_id, settings.dtype, base.device)
    try:
        yield
    finally:
        state.adapter_watcher.stop()
        engine.shutdown()
        state.feedback.stop()
        db_engine.dispose()

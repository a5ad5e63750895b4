from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI

from liveloop.settings import Settings
from serving.app import create_app


@contextmanager
def running_server(settings: Settings, app: FastAPI | None = None) -> Iterator[str]:
    """The real app (``create_app(settings)`` unless given) under uvicorn on a free loopback port, in a thread;
    yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app or create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start; see the log above")
            thread.join(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def serve(make_settings, tiny_model_dir):
    """Start the app on the tiny model with settings overrides: ``with serve(**overrides) as url``."""

    @contextmanager
    def start(**overrides) -> Iterator[str]:
        overrides.setdefault("base_model", tiny_model_dir)
        with running_server(make_settings(**overrides)) as url:
            yield url

    return start

"""``liveloop up``: the whole loop on one machine, started and stopped in order.

Ctrl-C in a terminal signals the whole foreground process group. The trainer and the embedded broker run in
sessions of their own, so that only this process hears it and stops them in order: the trainer first (the API
keeps serving while it finishes its step), then the API (its relay publishes what is left), the broker last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import typer
import uvicorn
from sqlalchemy import make_url

from liveloop.processes import stop_process
from liveloop.settings import Settings

app = typer.Typer()
log = logging.getLogger(__name__)

TRAINER_STOP_TIMEOUT_S = 10.0


@app.command()
def up() -> None:
    """Run the whole loop on one machine: broker (embedded unless LIVELOOP_KAFKA_BOOTSTRAP is set), the API
    with its outbox relay, and the trainer; SQLite under ./var and the packaged model by default."""
    from feedback.broker import resolved_kafka
    from feedback.kafka import ensure_topics
    from liveloop.cli import _settings, core_split, refuse_open, stop_signals
    from liveloop.db import migrate
    from liveloop.model import prepare_base_model
    from serving.app import create_app

    settings = _settings()
    refuse_open(settings, settings.host)

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    for signum in stop_signals():  # until uvicorn takes over: start-up is cut short, and stops what it started
        signal.signal(signum, interrupt)
    migrate(settings.resolved_database_url)  # once, before two processes would race to do it
    prepare_base_model(settings)
    # two busy processes on one machine: each gets its own share of the cores (torch's default, every core for
    # each, oversubscribes them; the trainer then ran at an eighth of its speed alone)
    serve_threads, train_threads = core_split(settings, os.cpu_count() or 1)
    settings = settings.model_copy(update={"torch_threads": serve_threads})
    with resolved_kafka(settings) as settings:
        ensure_topics(settings)
        env = {**os.environ, "LIVELOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "LIVELOOP_TORCH_THREADS": str(train_threads)}
        trainer = subprocess.Popen([sys.executable, "-m", "liveloop", "train"], env=env, start_new_session=True)
        try:
            server = _OrderedServer(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                                                   log_config=None, access_log=settings.access_log),
                                    on_ready=lambda: typer.echo(where(settings)),
                                    before_exit=lambda: _stop_trainer(trainer))
            server.run()
        finally:
            _stop_trainer(trainer)
        log.info("API stopped")


class _OrderedServer(uvicorn.Server):
    """uvicorn that calls ``on_ready`` once it listens, and at the first stop signal runs ``before_exit``
    (in a thread: the event loop keeps serving) before it begins its own shutdown; a second signal begins it at
    once. Unlike uvicorn's own, it does not raise the signal again once stopped, which would end ``up`` with a
    KeyboardInterrupt before it stopped the broker."""

    def __init__(self, config: uvicorn.Config, *, on_ready: Callable[[], None], before_exit: Callable[[], None]):
        super().__init__(config)
        self._on_ready, self._before_exit = on_ready, before_exit
        self._stopping: threading.Thread | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        from liveloop.cli import stop_signals

        handlers = {signum: signal.signal(signum, self.handle_exit) for signum in stop_signals()}
        try:
            yield
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self._stopping is None:
            self._stopping = threading.Thread(target=self._exit_after, args=(sig, frame), name="stop-in-order",
                                              daemon=True)
            self._stopping.start()
        else:
            super().handle_exit(sig, frame)

    def _exit_after(self, sig: int, frame) -> None:
        self._before_exit()
        if not self.should_exit:
            super().handle_exit(sig, frame)


def _stop_trainer(trainer: subprocess.Popen) -> None:
    """SIGTERM: the trainer finishes its step and exits; killed when it takes longer, it loses nothing either
    (see trainer.worker)."""
    stop_process(trainer, "trainer", sig=signal.SIGTERM, timeout_s=TRAINER_STOP_TIMEOUT_S)


def where(settings: Settings) -> str:
    """Where a person finds what ``up`` runs."""
    url = f"http://{settings.host}:{settings.port}"
    trainer_metrics = (f"http://{settings.host}:{settings.trainer_metrics_port}/" if settings.trainer_metrics_port
                       else "none (LIVELOOP_TRAINER_METRICS_PORT=0)")
    return "\n".join([
        "liveloop is up:",
        f"  API            {url}/v1 (OpenAI-compatible); chat page {url}/",
        f"  metrics        API {url}/metrics, trainer {trainer_metrics}",
        f"  data           {settings.data_dir.resolve()}",
        f"  database       {make_url(settings.resolved_database_url).render_as_string(hide_password=True)}",
        f"  adapters       {settings.resolved_artifact_dir.resolve()}",
        f"  Kafka          {settings.kafka_bootstrap}",
        "Ctrl-C stops the trainer, then the API, then the broker.",
    ])

"""The ``liveloop`` command: wiring of every process. Nothing imports this package."""

from __future__ import annotations

import logging

import typer

from liveloop.cli import adapter_commands
from liveloop.cli import feedback as feedback_commands
from liveloop.cli import simulate as simulate_commands
from liveloop.cli import trainer as trainer_commands
from liveloop.settings import Settings

app = typer.Typer(help="liveloop: serve a chat model and improve it from its users' thumbs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(feedback_commands.app)  # relay, replay, broker
app.add_typer(adapter_commands.app, name="adapters")  # list, show, promote, reject, rollback, diff
app.add_typer(trainer_commands.app)  # train
app.add_typer(simulate_commands.app)  # simulate, simulate-base-rates, simulate-plot


def _settings() -> Settings:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Settings()


@app.command()
def serve(host: str = typer.Option(None, help="Default: LIVELOOP_HOST."),
          port: int = typer.Option(None, help="Default: LIVELOOP_PORT.")) -> None:
    """Run the API alone, as a production replica does."""
    import uvicorn

    from serving.app import create_app

    settings = _settings()
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info")


@app.command()
def up() -> None:
    """Run the whole loop on one machine: broker (embedded unless LIVELOOP_KAFKA_BOOTSTRAP is set), the API
    with its outbox relay, and the trainer; SQLite under ./var and the packaged model by default."""
    import os
    import subprocess
    import sys

    from feedback.broker import resolved_kafka
    from feedback.kafka import ensure_topics
    from liveloop.db import migrate
    from liveloop.model import prepare_base_model
    from serving.app import create_app

    settings = _settings()
    migrate(settings.resolved_database_url)  # once, before two processes would race to do it
    prepare_base_model(settings)
    serve_threads, train_threads = core_split(settings, os.cpu_count() or 1)
    settings = settings.model_copy(update={"torch_threads": serve_threads})
    # Ctrl-C signals the terminal's whole process group; the trainer and the broker run in sessions of their own,
    # so that they stop in order: the trainer first (told as the API begins its shutdown), the broker last
    with resolved_kafka(settings) as settings:
        ensure_topics(settings)
        env = {**os.environ, "LIVELOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "LIVELOOP_TORCH_THREADS": str(train_threads)}
        trainer = subprocess.Popen([sys.executable, "-m", "liveloop", "train"], env=env, start_new_session=True)
        try:
            _serve(create_app(settings), settings, on_exit=trainer.terminate)
        finally:  # the trainer finishes its step; killed, it loses nothing either (see trainer.worker)
            trainer.terminate()
            try:
                trainer.wait(10)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait()


def core_split(settings: Settings, cores: int) -> tuple[int, int]:
    """torch threads of the API and of the trainer under ``liveloop up``: ``serve_threads`` and ``train_threads``,
    where 0 means half the cores to the trainer and the rest to the API, each at least 1."""
    train = settings.train_threads or max(1, cores // 2)
    return settings.serve_threads or max(1, cores - train), train


def _serve(app, settings: Settings, *, on_exit) -> None:
    """uvicorn until SIGINT/SIGTERM, calling ``on_exit`` first when one arrives."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
    api_exit = server.handle_exit

    def handle_exit(sig, frame) -> None:
        on_exit()
        api_exit(sig, frame)

    server.handle_exit = handle_exit
    server.run()


@app.command("prepare-model")
def prepare_model() -> None:
    """Convert the packaged model into the model cache (or check LIVELOOP_BASE_MODEL) and say where it is."""
    from liveloop.model import prepare_base_model

    model_id, path = prepare_base_model(_settings())
    typer.echo(f"{model_id}: {path}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the schema this code needs."""
    from liveloop.db import migrate

    settings = _settings()
    migrate(settings.resolved_database_url)
    typer.echo(f"database at head: {settings.resolved_database_url}")

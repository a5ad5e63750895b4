"""The ``liveloop`` command: wiring of every process. Nothing imports this package."""

from __future__ import annotations

import ipaddress
import logging
import signal

import typer

from liveloop.cli import adapter_commands
from liveloop.cli import feedback as feedback_commands
from liveloop.cli import simulate as simulate_commands
from liveloop.cli import trainer as trainer_commands
from liveloop.cli import up as up_commands
from liveloop.logs import configure_logging
from liveloop.settings import Settings

app = typer.Typer(help="liveloop: serve a chat model and improve it from its users' thumbs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(feedback_commands.app)  # relay, replay, broker
app.add_typer(adapter_commands.app, name="adapters")  # list, show, promote, reject, rollback, diff
app.add_typer(trainer_commands.app)  # train
app.add_typer(up_commands.app)  # up
app.add_typer(simulate_commands.app)  # simulate, simulate-base-rates, simulate-plot


# Libraries whose INFO lines (every Kafka connection, every migration context) drown what liveloop says.
QUIET_LIBRARIES = ("kafka", "alembic", "httpx", "httpcore", "urllib3", "filelock")


def _settings() -> Settings:
    """The settings read and logging set up; invalid or unknown LIVELOOP_ variables end the command (exit 2)."""
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError is one; the messages name the variables
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_format)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    return settings


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a long-running command: Ctrl-C, ``kill``, and a closed terminal (unless under nohup, which set
    SIGHUP ignored). Commands with children in sessions of their own handle all of them, or the children would
    outlive them."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def refuse_open(settings: Settings, host: str) -> None:
    """An API without keys answers anyone who reaches it: it listens beyond loopback only when asked to."""
    if settings.api_keys or settings.allow_open or _is_loopback(host):
        return
    typer.echo(f"refusing to serve on {host} without API keys: set LIVELOOP_API_KEYS (user:key,...), or "
               f"LIVELOOP_ALLOW_OPEN=true to let anyone who reaches {host} chat and rate", err=True)
    raise typer.Exit(2)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        return host == "localhost"


@app.command()
def serve(host: str = typer.Option(None, help="Default: LIVELOOP_HOST."),
          port: int = typer.Option(None, help="Default: LIVELOOP_PORT.")) -> None:
    """Run the API alone, as a production replica does."""
    settings = _settings()
    refuse_open(settings, host or settings.host)
    import uvicorn

    from serving.app import create_app

    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_config=None,
                access_log=settings.access_log)


def core_split(settings: Settings, cores: int) -> tuple[int, int]:
    """torch threads of the API and of the trainer under ``liveloop up``: ``serve_threads`` and ``train_threads``,
    where 0 means half the cores to the trainer and the rest to the API, each at least 1."""
    train = settings.train_threads or max(1, cores // 2)
    return settings.serve_threads or max(1, cores - train), train


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

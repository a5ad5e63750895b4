"""``liveloop relay``, ``liveloop replay`` and ``liveloop broker``: the feedback log's processes."""

from __future__ import annotations

import signal
from datetime import datetime

import typer

from liveloop.settings import Settings

app = typer.Typer()


def _kafka_settings() -> Settings:
    from liveloop.cli import _settings

    settings = _settings()
    if not settings.kafka_bootstrap:
        typer.echo("LIVELOOP_KAFKA_BOOTSTRAP is not set: point it at the Kafka the trainer reads "
                   "(for development, start one with 'liveloop broker').", err=True)
        raise typer.Exit(2)
    return settings


@app.command()
def relay(metrics_port: int = typer.Option(9102, help="Serve Prometheus metrics on this port; 0 disables.")) -> None:
    """Publish the outbox to Kafka, alone (e.g. with LIVELOOP_RELAY_IN_API=false on the API replicas)."""
    from prometheus_client import start_http_server

    from feedback.relay import Relay
    from liveloop.db import make_sessionmaker, open_database

    settings = _kafka_settings()
    engine = open_database(settings)
    if metrics_port:
        start_http_server(metrics_port)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # the relay thread inherits the mask; we wait below
    outbox_relay = Relay(make_sessionmaker(engine), settings).start()
    typer.echo(f"relaying the outbox of {engine.url.render_as_string()} to {settings.kafka_bootstrap}")
    signal.sigwait(stop_signals)
    outbox_relay.stop()
    engine.dispose()


@app.command()
def replay(since: datetime = typer.Option(..., help="Start of the window (ISO 8601; UTC unless a zone is given)."),
           until: datetime = typer.Option(None, help="End of the window, exclusive; default: now.")) -> None:
    """Republish the feedback events stored in a time window (backfills, or a broker that lost its log)."""
    from feedback.replay import replay as replay_events
    from liveloop.db import make_sessionmaker, open_database

    settings = _kafka_settings()
    engine = open_database(settings)
    count = replay_events(make_sessionmaker(engine), settings, since=since, until=until)
    engine.dispose()
    typer.echo(f"republished {count} feedback events to {settings.feedback_topic}")


@app.command()
def broker(port: int = typer.Option(9092, help="Loopback port to listen on.")) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory only) in the foreground until Ctrl-C."""
    from feedback.broker import EmbeddedBroker
    from feedback.kafka import ensure_topics
    from liveloop.cli import _settings, stop_signals

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Tansu runs in a session of its own: every stop signal is handled, or Tansu would outlive us; SIGINT too,
    # explicitly (under nohup or a background job it arrives ignored)
    handled = stop_signals()

    def stop(signum, frame) -> None:
        for stop_signal in handled:  # one stop: a second signal must not cut Tansu's short
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    for signum in handled:
        signal.signal(signum, stop)
    try:
        with EmbeddedBroker(port=port, log_path=settings.data_dir / "tansu.log") as running:
            ensure_topics(settings.model_copy(update={"kafka_bootstrap": running.bootstrap}))
            typer.echo(f"Kafka-compatible broker ready: export LIVELOOP_KAFKA_BOOTSTRAP={running.bootstrap}")
            running.wait()
    except KeyboardInterrupt:  # wherever it came, leaving the block stopped Tansu
        pass

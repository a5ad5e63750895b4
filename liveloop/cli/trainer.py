"""``liveloop train``: the trainer process (one per policy)."""

from __future__ import annotations

import logging
import signal
import threading

import typer

app = typer.Typer()
log = logging.getLogger(__name__)


@app.command()
def train() -> None:
    """Consume ratings from Kafka and run PPO on the policy adapter; write and gate candidate versions."""
    from prometheus_client import REGISTRY, start_http_server

    from feedback.consumer import FeedbackConsumer
    from feedback.kafka import ensure_topics
    from feedback.ledger import Ledger
    from liveloop.artifacts import LocalArtifactStore
    from liveloop.cli import _settings
    from liveloop.db import make_sessionmaker, open_database
    from liveloop.model import load_base_model
    from liveloop.promotion import Promoter
    from liveloop.registry import Registry
    from liveloop.state_metrics import StateCollector
    from trainer.worker import Trainer

    settings = _settings()
    if not settings.kafka_bootstrap:
        typer.echo("LIVELOOP_KAFKA_BOOTSTRAP is not set: point it at the Kafka the API relays feedback to.", err=True)
        raise typer.Exit(2)
    db_engine = open_database(settings)
    sessions = make_sessionmaker(db_engine)
    # the trainer computes in float32 whatever serving uses; PPOConfig decides on bf16 autocast
    base = load_base_model(settings.model_copy(update={"dtype": "float32"}))
    ensure_topics(settings)
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir),
                        events_topic=settings.adapter_events_topic)
    if settings.trainer_metrics_port:
        REGISTRY.register(StateCollector(registry, sessions, settings))  # the loop's state, one process per policy
        start_http_server(settings.trainer_metrics_port)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # canary decisions and rollback checks run beside training, in this process (one per policy)
    threading.Thread(target=Promoter(registry, settings).run, args=(stop,), name="promotion", daemon=True).start()
    # the database holds the offsets and the consumed ratings: the consumer seeks there, and refills a broker that
    # lost them; repeats of consumed ratings are dropped against the same records
    ledger = Ledger(sessions, settings.feedback_consumer_group)
    with FeedbackConsumer(settings, ledger=ledger) as consumer:
        trainer = Trainer(settings, base, registry=registry, sessions=sessions, consumer=consumer)
        log.info("training %s on %s ratings from %s", trainer.version_name or "a fresh adapter",
                 settings.reward_source, settings.feedback_topic)
        trainer.run(stop)
    db_engine.dispose()

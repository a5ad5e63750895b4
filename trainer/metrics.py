"""Training metrics for Prometheus, under the names the update returns and the gates read."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from trainer.update import METRIC_NAMES

UPDATE = {name: Gauge(f"liveloop_trainer_{name}", f"PPO update: {name} of the last update") for name in METRIC_NAMES}
UPDATES = Counter("liveloop_trainer_updates", "PPO updates, by outcome", ["outcome"])
CANDIDATES = Counter("liveloop_trainer_candidates", "Candidate adapter versions written")
RATINGS = Counter("liveloop_trainer_ratings", "Ratings consumed, by use", ["use"])
REWARD_MODEL_ACCURACY = Gauge("liveloop_trainer_reward_model_heldout_accuracy", "Reward model held-out accuracy")
BEHAVIOUR_MISMATCH = Gauge(
    "liveloop_trainer_behaviour_logprob_mismatch",
    "Mean |recomputed − recorded| behaviour log-prob of logged samples served by the trainer's current version",
)


def export_update(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if name in UPDATE:
            UPDATE[name].set(value)
    outcome = "applied" if metrics.get("applied") else "discarded" if metrics.get("discarded") else "skipped"
    UPDATES.labels(outcome).inc()

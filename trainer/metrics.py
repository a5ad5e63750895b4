"""Training metrics for Prometheus, under the names the update returns and the gates read."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge

from trainer.update import METRIC_NAMES

UPDATE = {name: Gauge(f"liveloop_trainer_{name}", f"PPO update: {name} of the last update") for name in METRIC_NAMES}
UPDATES = Counter("liveloop_trainer_updates", "PPO updates, by outcome", ["outcome"])
CANDIDATES = Counter("liveloop_trainer_candidates", "Candidate adapter versions written")
RATINGS = Counter("liveloop_trainer_ratings", "Ratings consumed, by use", ["use"])
REWARD_MODEL_BALANCED_ACCURACY = Gauge(
    "liveloop_trainer_reward_model_heldout_balanced_accuracy",
    "Reward model held-out balanced accuracy (mean of the accuracy on thumbs up and on thumbs down; a constant "
    "score gets 0.5); NaN while the held-out split lacks either thumb, or there is no reward model",
)
REWARD_MODEL_BALANCED_ACCURACY.set(math.nan)  # a gauge starts at 0, which would read as "always wrong"
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

"""Training metrics for Prometheus, under the names the update returns and the gates read."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

from trainer.update import METRIC_NAMES

UPDATE = {name: Gauge(f"liveloop_trainer_{name}", f"PPO update: {name} of the last update") for name in METRIC_NAMES}
UPDATES = Counter("liveloop_trainer_updates_total", "PPO updates, by outcome", ["outcome"])
CANDIDATES = Counter("liveloop_trainer_candidates_total", "Candidate adapter versions written")
RATINGS = Counter("liveloop_trainer_ratings_total", "Ratings consumed, by use", ["use"])
# one turn of the loop: wait for a batch of ratings, train on it, gate the candidate, apply the promotion policy
STAGE_SECONDS = Histogram(
    "liveloop_trainer_stage_duration_seconds", "Duration of one stage of the trainer's loop: gather (waiting for "
    "ratings), train (the PPO update and the candidate's registration), gate, decide (the promotion policy)",
    ["stage"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
for outcome in ("applied", "discarded", "skipped"):  # every series exists from the start, at 0
    UPDATES.labels(outcome)
for stage in ("gather", "train", "gate", "decide"):
    STAGE_SECONDS.labels(stage)
REWARD_MODEL_BALANCED_ACCURACY = Gauge(
    "liveloop_trainer_reward_model_heldout_balanced_accuracy",
    "Reward model held-out balanced accuracy (mean of the accuracy on thumbs up and on thumbs down; a constant "
    "score gets 0.5); NaN while the held-out split lacks either thumb, or there is no reward model",
)
REWARD_MODEL_AUC = Gauge(
    "liveloop_trainer_reward_model_heldout_auc",
    "Reward model held-out AUC on thumbs: the share of (up, down) pairs of ratings it never trained on that it "
    "scores in that order (a tie counts half); what decides whether PPO may use it; NaN as the balanced accuracy",
)
REWARD_MODEL_COMPARISON_ACCURACY = Gauge(
    "liveloop_trainer_reward_model_heldout_comparison_accuracy",
    "Reward model held-out accuracy on comparisons: the share of (preferred, ranked below) pairs of comparisons it "
    "never trained on that it scores in the user's order (a tie counts half); NaN before any such comparison, or "
    "without a reward model",
)
for gauge in (REWARD_MODEL_BALANCED_ACCURACY, REWARD_MODEL_COMPARISON_ACCURACY):
    gauge.set(math.nan)  # a gauge starts at 0, which would read as "always wrong"
BEHAVIOUR_MISMATCH = Gauge(
    "liveloop_trainer_behaviour_logprob_mismatch_nats",
    "Mean |recomputed − recorded| behaviour log-prob of logged samples served by the trainer's current version",
)


def export_update(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if name in UPDATE:
            UPDATE[name].set(value)
    outcome = "applied" if metrics.get("applied") else "discarded" if metrics.get("discarded") else "skipped"
    UPDATES.labels(outcome).inc()

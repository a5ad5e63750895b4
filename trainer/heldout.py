"""Held-out splits: completions a purpose never trains on, chosen by a stable hash of the completion id.

Each split is salted by its purpose, so the gates' split and the reward model's are independent: the same id
is held out in every process and every increment, and growing a fraction never moves an id out of its split.
"""

from __future__ import annotations

from liveloop.promotion import stable_fraction

GATES_SPLIT = "gates"  # never trained on by the policy or the reward model: the gates' evidence
REWARD_MODEL_SPLIT = "reward-model"  # never trained on by the reward model: its held-out balanced accuracy


def heldout_key(completion_id: str, *, split: str) -> float:
    """The id's place in [0, 1) for ``split``: held out below the fraction, and the order of a fixed sample."""
    return stable_fraction(f"{split}\0{completion_id}")


def is_heldout(completion_id: str, fraction: float, *, split: str) -> bool:
    """Whether ``completion_id`` falls in the ``fraction`` of ids held out for ``split``."""
    return heldout_key(completion_id, split=split) < fraction

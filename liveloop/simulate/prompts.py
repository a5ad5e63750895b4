"""The prompts simulated users ask (training) and the disjoint ones only evaluation asks."""

from __future__ import annotations

from importlib import resources

TRAIN_FILE = "simulate_train_prompts.txt"
EVAL_FILE = "simulate_eval_prompts.txt"


def load_prompts(filename: str) -> list[str]:
    text = resources.files("liveloop").joinpath("data", filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def train_prompts() -> list[str]:
    return load_prompts(TRAIN_FILE)


def eval_prompts() -> list[str]:
    return load_prompts(EVAL_FILE)

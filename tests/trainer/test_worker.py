"""The trainer process end to end: ratings on the real broker → PPO → candidate in the registry → offsets."""

from __future__ import annotations

import uuid

import pytest
import torch

from feedback.consumer import FeedbackConsumer
from feedback.events import FeedbackEvent
from feedback.kafka import Message, Publisher, ensure_topics
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.engine.offline import generate
from liveloop.model import load_base_model
from liveloop.registry import Kind, Registry, State
from liveloop.sampling import SamplingParams
from liveloop.tables import utcnow
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.worker import Trainer

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name an animal.", "Tell me a fruit.", "Say bye.",
           "Name a city.", "Give me a number."]


@pytest.fixture
def trainer_settings(kafka_settings, tiny_model_dir, tmp_path):
    def make(**overrides):
        settings = kafka_settings(
            base_model=tiny_model_dir, database_url=f"sqlite:///{tmp_path / 'liveloop.db'}", train_batch_min=6,
            train_batch_max=64, train_poll_s=1.0, trainer_metrics_port=0, promotion_policy="manual",
            gate_holdout_fraction=0.001, gate_prompts=2, gate_max_new_tokens=4,
            ppo={"ppo_epochs": 1, "num_minibatches": 1}, **overrides)
        migrate(settings.resolved_database_url)
        ensure_topics(settings)
        return settings

    return make


def _served_ratings(settings, count: int) -> list[FeedbackEvent]:
    """Completions sampled from the base model as serving would, rated up when the response is short."""
    base = load_base_model(settings)
    prompts = [base.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"] for p in PROMPTS[:count]]
    params = [SamplingParams(temperature=1.0, max_tokens=6)] * count
    generations = generate(base.model, prompts, params, eos_token_ids=base.eos_token_ids,
                           generator=torch.Generator().manual_seed(0))
    events = []
    for g in generations:
        up = len(g.response_ids) < 6
        events.append(FeedbackEvent(
            event_id=uuid.uuid4().hex, feedback_id=uuid.uuid4().hex, completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            revision=1, rating="up" if up else "down", reward=1.0 if up else -1.0, supersedes=None,
            rated_at=utcnow(), messages=[], prompt_token_ids=list(g.prompt_ids),
            response_token_ids=list(g.response_ids), behaviour_logprobs=list(g.behaviour_logprobs),
            adapter_version=None, sampling_params=g.sampling_params.to_dict(), dtype="float32",
            completion_created_at=utcnow()))
    publisher = Publisher(settings, "test")
    assert publisher.publish([Message(settings.feedback_topic, e.completion_id, e.to_bytes()) for e in events]) \
        == [None] * len(events)
    publisher.close()
    return events


def _trainer(settings) -> tuple[Trainer, Registry]:
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
    trainer = Trainer(settings, load_base_model(settings), registry=registry, sessions=sessions,
                      consumer=FeedbackConsumer(settings))
    return trainer, registry


def test_trainer_stopped_between_saving_and_committing_trains_the_batch_again_once(trainer_settings):
    settings = trainer_settings()
    events = _served_ratings(settings, 8)
    fraction = settings.gate_holdout_fraction
    trainable = {e.event_id for e in events if not is_heldout(e.completion_id, fraction, split=GATES_SPLIT)}

    first, registry = _trainer(settings)
    orphan = first.train(first.gather())  # written and registered ... and then the process dies: no commit
    first.consumer.close()
    assert orphan is not None and set(registry.get(orphan.name).consumed_event_ids) == trainable

    second, registry = _trainer(settings)  # a restarted process: same consumer group
    assert registry.get(orphan.name).state == State.REJECTED
    assert "orphan" in registry.audit(orphan.name)[0].reason
    assert second.version_name is None  # resumed from the base, not from the orphan
    retrained = second.consume(second.gather())
    version = registry.get(retrained.name)
    assert sorted(version.consumed_event_ids) == sorted(trainable)  # every rating, each once
    assert version.parent is None and version.reward_source == "direct"
    assert version.gate_report is not None and version.state in (State.APPROVED, State.REJECTED)
    second.consumer.close()

    third, registry = _trainer(settings)  # offsets were committed: nothing is trained twice
    assert third.version_name == retrained.name
    assert third.consumer.next_batch(max_wait_s=2.0).events == []
    third.consumer.close()
    assert [v.name for v in registry.versions(kind=Kind.POLICY)] == [retrained.name, orphan.name]


def test_reward_model_mode_trains_the_reward_model_and_updates_on_fresh_rollouts(trainer_settings):
    settings = trainer_settings(reward_source="reward_model", rollout={"max_tokens": 6})
    _served_ratings(settings, 8)
    trainer, registry = _trainer(settings)
    candidate = trainer.consume(trainer.gather())
    trainer.consumer.close()
    reward_versions = registry.versions(kind=Kind.REWARD)
    assert candidate is not None and len(reward_versions) == 1
    assert registry.get(candidate.name).reward_source == f"reward_model:{reward_versions[0].name}"
    assert candidate.metrics["samples"] == 8 and candidate.metrics["applied"] == 1.0

    retuned = settings.model_copy(update={"reward_model": {"lr": 3e-4, "epochs_per_increment": 3}})
    restarted, _ = _trainer(retuned)  # resumes the saved reward model, trained on with the configured settings
    restarted.consumer.close()
    assert restarted.reward_model_name == reward_versions[0].name
    assert restarted.reward_model.increments == 1
    assert (restarted.reward_model.config.lr, restarted.reward_model.config.epochs_per_increment) == (3e-4, 3)
    assert restarted.reward_model.optimizer.param_groups[0]["lr"] == 3e-4

"""The trainer process end to end: ratings on the real broker → PPO → candidate in the registry → offsets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
import torch
from peft import get_peft_model_state_dict
from sqlalchemy import select

from feedback.consumer import FeedbackConsumer
from feedback.events import ComparedCompletion, ComparisonEvent, FeedbackEvent
from feedback.kafka import Message, Publisher, ensure_topics
from feedback.ledger import Ledger, subject
from feedback.relay import Relay
from feedback.service import ComparisonRequest, FeedbackConfig, record_batch
from liveloop.adapter_artifacts import read_adapter
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.engine.offline import generate
from liveloop.model import load_base_model
from liveloop.registry import Kind, Registry, State
from liveloop.sampling import SamplingParams
from liveloop.tables import Completion, ConsumedFeedback, OutboxMessage, utcnow
from tests.feedback.helpers import rate_each, read_topic, wait_until
from trainer import metrics
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.policy import POLICY_ADAPTER
from trainer.worker import Trainer

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name an animal.", "Tell me a fruit.", "Say bye.",
           "Name a city.", "Give me a number."]


@pytest.fixture
def trainer_settings(kafka_settings, tiny_model_dir, tmp_path):
    def make(**overrides):
        settings = kafka_settings(**{
            "base_model": tiny_model_dir, "database_url": f"sqlite:///{tmp_path / 'liveloop.db'}",
            "train_batch_min": 6, "train_batch_max": 64, "train_poll_s": 1.0, "trainer_metrics_port": 0,
            "promotion_policy": "manual", "gate_holdout_fraction": 0.001, "gate_prompts": 2,
            "gate_max_new_tokens": 4, "ppo": {"ppo_epochs": 1, "num_minibatches": 1}} | overrides)
        migrate(settings.resolved_database_url)
        ensure_topics(settings)
        return settings

    return make


def _generations(settings, count: int, seed: int = 0):
    base = load_base_model(settings)
    prompts = [base.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                  add_generation_prompt=True, return_dict=True)["input_ids"]
               for i in range(count)]
    params = [SamplingParams(temperature=1.0, max_tokens=6)] * count
    return generate(base.model, prompts, params,
                    eos_token_ids=base.eos_token_ids, generator=torch.Generator().manual_seed(seed))


def _logged(g) -> dict:
    """The served completion of generation ``g``, as events carry it; a fresh completion id."""
    return dict(completion_id=f"chatcmpl-{uuid.uuid4().hex}", messages=[], prompt_token_ids=list(g.prompt_ids),
                response_token_ids=list(g.response_ids), behaviour_logprobs=list(g.behaviour_logprobs),
                adapter_version=None, sampling_params=g.sampling_params.to_dict(), dtype="float32",
                completion_created_at=utcnow())


def _publish(settings, events: list[FeedbackEvent | ComparisonEvent]) -> None:
    publisher = Publisher(settings, "test")
    assert publisher.publish([Message(settings.feedback_topic, subject(e), e.to_bytes()) for e in events]) \
        == [None] * len(events)
    publisher.close()


def _served_ratings(settings, count: int, *, alternate: bool = False) -> list[FeedbackEvent]:
    """Completions sampled from the base model as serving would, rated up when the response is short (or every
    other one up, with ``alternate``)."""
    events = []
    for i, g in enumerate(_generations(settings, count)):
        up = i % 2 == 0 if alternate else len(g.response_ids) < 6
        events.append(FeedbackEvent(
            event_id=uuid.uuid4().hex, feedback_id=uuid.uuid4().hex, revision=1, rating="up" if up else "down",
            reward=1.0 if up else -1.0, supersedes=None, rated_at=utcnow(), **_logged(g)))
    _publish(settings, events)
    return events


def _served_comparisons(settings, count: int) -> list[ComparisonEvent]:
    """Two answers of the base model to each of ``count`` prompts, the shorter one preferred (the first on a tie);
    published, not in the gates' held-out split."""
    events = []
    for pair in zip(_generations(settings, count, seed=1), _generations(settings, count, seed=2), strict=True):
        ranking = sorted(pair, key=lambda g: len(g.response_ids))
        answers = [ComparedCompletion(**_logged(g)) for g in ranking]
        while any(is_heldout(a.completion_id, settings.gate_holdout_fraction, split=GATES_SPLIT) for a in answers):
            answers = [ComparedCompletion(**_logged(g)) for g in ranking]
        events.append(_comparison(f"chatcmpl-{uuid.uuid4().hex}", answers))
    _publish(settings, events)
    return events


def _comparison(request_id: str, answers: list[ComparedCompletion], revision: int = 1) -> ComparisonEvent:
    return ComparisonEvent(event_id=uuid.uuid4().hex, feedback_id=uuid.uuid4().hex, request_id=request_id,
                           revision=revision, supersedes=None, rated_at=utcnow(), ranking=answers)


def _served_completions(settings, sessions, count: int, seed: int = 0) -> list[str]:
    """Completions of the base model stored as serving stores them, none in the gates' held-out split; their ids."""
    ids = []
    with sessions.begin() as session:
        for g in _generations(settings, count, seed):
            ids.append(f"chatcmpl-{uuid.uuid4().hex}")
            while is_heldout(ids[-1], settings.gate_holdout_fraction, split=GATES_SPLIT):
                ids[-1] = f"chatcmpl-{uuid.uuid4().hex}"
            session.add(Completion(
                id=ids[-1], created_at=utcnow(), finished_at=utcnow(), user_id=None, end_user=None,
                requested_model="liveloop", adapter_version=None, messages=[],
                prompt_token_ids=list(g.prompt_ids), response_token_ids=list(g.response_ids), response_text="",
                behaviour_logprobs=list(g.behaviour_logprobs),
                sampling_params=g.sampling_params.to_dict(), dtype="float32", finish_reason="stop",
                prompt_tokens=len(g.prompt_ids), completion_tokens=len(g.response_ids), latency_ms=1.0))
    return ids


def _rate(settings, sessions, completion_ids: list[str], rating: str = "up", relay: bool = True) -> list[str]:
    """Rate through the feedback service (feedback and outbox rows) and relay to the broker; the event ids."""
    recorded = rate_each(sessions, settings, completion_ids, rating=rating)
    if relay:
        _relay(settings, sessions)
    with sessions() as session:
        return list(session.scalars(select(OutboxMessage.event_id).where(
            OutboxMessage.payload["feedback_id"].as_string().in_([r.id for r in recorded]))))


def _compared_pairs(settings, sessions, count: int) -> list[tuple[str, str]]:
    """``count`` chat requests answered twice (n = 2) by the base model, stored as serving stores them; the ids of
    each request's two choices."""
    pairs = list(zip(*(_served_completions(settings, sessions, count, seed) for seed in (1, 2)), strict=True))
    with sessions.begin() as session:
        for pair in pairs:
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            for index, completion_id in enumerate(pair):
                completion = session.get(Completion, completion_id)
                completion.request_id, completion.choice_index = request_id, index
    return pairs


def _compare(settings, sessions, rankings: list[tuple[str, ...]], relay: bool = True) -> list[str]:
    """Rank through the feedback service (comparison and outbox rows) and relay to the broker; the event ids."""
    recorded = record_batch(sessions, [ComparisonRequest(ranking) for ranking in rankings],
                            config=FeedbackConfig.from_settings(settings))
    if relay:
        _relay(settings, sessions)
    with sessions() as session:
        return list(session.scalars(select(OutboxMessage.event_id).where(
            OutboxMessage.payload["feedback_id"].as_string().in_([r.id for r in recorded]))))


def _relay(settings, sessions) -> None:
    relay = Relay(sessions, settings)
    while relay.relay_once()[0]:
        pass
    assert relay.depth() == 0
    relay.stop()


def _outcomes(sessions) -> dict[str, tuple[str, str | None]]:
    with sessions() as session:
        return {row.event_id: (row.outcome, row.version) for row in session.scalars(select(ConsumedFeedback))}


def _trainer(settings) -> tuple[Trainer, Registry]:
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
    consumer = FeedbackConsumer(settings, ledger=Ledger(sessions, settings.feedback_consumer_group))
    trainer = Trainer(settings, load_base_model(settings), registry=registry, sessions=sessions, consumer=consumer)
    return trainer, registry


def test_a_trainer_stopped_after_registering_never_trains_its_batch_again(trainer_settings):
    """The candidate and the consumed offsets are one transaction: whether Kafka's commit followed or not, a
    restarted trainer keeps the candidate (no orphan) and seeks past its batch."""
    settings = trainer_settings()
    events = _served_ratings(settings, 8)
    fraction = settings.gate_holdout_fraction
    trainable = {e.event_id for e in events if not is_heldout(e.completion_id, fraction, split=GATES_SPLIT)}

    first, registry = _trainer(settings)
    written = first.train(first.gather())  # written and registered ... and then the process dies: no Kafka commit
    first.consumer.close()
    assert written is not None and set(registry.get(written.name).consumed_event_ids) == trainable

    second, registry = _trainer(settings)  # a restarted process: same consumer group, nothing committed in Kafka
    assert registry.get(written.name).state in (State.APPROVED, State.REJECTED)  # gated at start, not an orphan
    assert all("orphan" not in t.reason for t in registry.audit(written.name))
    assert second.consumer.next_batch(max_wait_s=3.0).events == []  # sought past the batch
    again = _served_ratings(settings, 8)
    following = second.consume(second.gather())
    second.consumer.close()
    assert set(registry.get(following.name).consumed_event_ids) == {
        e.event_id for e in again if not is_heldout(e.completion_id, fraction, split=GATES_SPLIT)}


def test_ratings_the_broker_lost_are_republished_and_trained_once(trainer_settings, broker):
    """The broker restarts empty (the embedded one keeps nothing): ratings no version consumed come back from
    the database; those already trained on do not."""
    settings = trainer_settings(train_batch_max=6)
    trainer, registry = _trainer(settings)
    sessions = trainer.sessions
    completions = _served_completions(settings, sessions, 12)
    first_ids = _rate(settings, sessions, completions[:6])
    first = trainer.consume(trainer.gather())
    trainer.consumer.close()
    later_ids = _rate(settings, sessions, completions[6:])  # on the broker, not consumed yet ...
    broker.stop()  # ... and lost with it
    broker.start()
    ensure_topics(settings)

    restarted, registry = _trainer(settings)
    second = restarted.consume(restarted.gather())
    assert restarted.consumer.next_batch(max_wait_s=2.0).events == []
    restarted.consumer.close()
    trained = [registry.get(c.name).consumed_event_ids for c in (first, second)]
    assert sorted(trained[0]) == sorted(first_ids) and sorted(trained[1]) == sorted(later_ids)
    assert all("orphan" not in t.reason for t in registry.audit(first.name))  # never taken for an orphan
    approved = registry.get(first.name).state == State.APPROVED
    assert registry.get(second.name).parent == (first.name if approved else None)


def test_only_the_latest_rating_of_a_completion_is_trained_across_batches(trainer_settings):
    """A rating superseded before training is never trained; a change of mind after training is trained with its
    new sign in a later update."""
    settings = trainer_settings()
    trainer, registry = _trainer(settings)
    sessions = trainer.sessions
    completions = _served_completions(settings, sessions, 13)
    changed, late = completions[0], completions[12]
    first_ids = _rate(settings, sessions, completions[:6])
    [stale] = _rate(settings, sessions, [late])  # relayed ...
    [late_down] = _rate(settings, sessions, [late], rating="down", relay=False)  # ... and replaced before training
    first = trainer.consume(trainer.gather())
    assert sorted(registry.get(first.name).consumed_event_ids) == sorted(first_ids)
    assert _outcomes(sessions)[stale] == ("superseded", None)

    [change_of_mind] = _rate(settings, sessions, [changed], rating="down")  # after training on its "up"
    later_ids = _rate(settings, sessions, completions[6:12])
    second = trainer.consume(trainer.gather())
    trainer.consumer.close()
    assert sorted(registry.get(second.name).consumed_event_ids) == sorted([change_of_mind, late_down, *later_ids])
    outcomes = _outcomes(sessions)
    assert outcomes[change_of_mind] == ("trained", second.name) and outcomes[first_ids[0]] == ("trained", first.name)


def test_after_a_rejection_or_a_rollback_training_continues_from_what_serves(trainer_settings):
    settings = trainer_settings()
    trainer, registry = _trainer(settings)
    _served_ratings(settings, 8)
    live = trainer.train(trainer.gather())
    registry.judge(live.name, report={}, failed=[])
    registry.promote(live.name, actor="test", reason="test")
    _served_ratings(settings, 8)
    rejected = trainer.train(trainer.gather())
    assert registry.get(rejected.name).parent == live.name
    registry.judge(rejected.name, report={}, failed=["kl"])
    trainer._follow_serving()  # what the next update does first: the live version's weights, loaded in place
    stored = read_adapter(registry.artifact(live.name)).tensors
    loaded = get_peft_model_state_dict(trainer.policy.model, adapter_name=POLICY_ADAPTER)
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)

    _served_ratings(settings, 8)
    after_rejection = trainer.train(trainer.gather())
    assert registry.get(after_rejection.name).parent == live.name  # not the rejected one
    assert trainer.policy.version == 2  # live's version + 1
    registry.judge(after_rejection.name, report={}, failed=[])  # approved: the newest that may serve next

    _served_ratings(settings, 8)
    on_approved = trainer.train(trainer.gather())
    assert registry.get(on_approved.name).parent == after_rejection.name
    registry.judge(on_approved.name, report={}, failed=["kl"])
    registry.reject(after_rejection.name, actor="test", reason="test")
    registry.rollback(actor="test", reason="test")  # the base model serves again

    _served_ratings(settings, 8)
    after_rollback = trainer.train(trainer.gather())
    trainer.consumer.close()
    assert registry.get(after_rollback.name).parent is None
    assert trainer.policy.version == 1

    restarted, _ = _trainer(settings)  # a restart gates the pending candidate, then picks the same rule's start
    restarted.consumer.close()
    approved = registry.get(after_rollback.name).state == State.APPROVED
    assert restarted.version_name == (after_rollback.name if approved else None)


def test_candidates_wait_unjudged_while_a_canary_holds_the_slot_and_the_newest_is_judged_when_it_frees(
        trainer_settings):
    settings = trainer_settings(promotion_policy="auto", canary_min_trained_ratings=0)
    trainer, registry = _trainer(settings)
    _served_ratings(settings, 8)
    canary = trainer.consume(trainer.gather())
    assert registry.get(canary.name).state == State.CANARY  # the slot was free: judged and started at once
    _served_ratings(settings, 8)
    waiting = trainer.consume(trainer.gather())
    _served_ratings(settings, 8)
    newest = trainer.consume(trainer.gather())
    assert [registry.get(v.name).state for v in (waiting, newest)] == [State.CANDIDATE] * 2  # not judged
    assert registry.get(waiting.name).parent == canary.name
    assert registry.get(newest.name).parent == waiting.name  # training goes on from the waiting candidate

    registry.reject(canary.name, actor="test", reason="test", expect=State.CANARY)  # the slot frees
    trainer._gate_when_wanted()
    trainer.consumer.close()
    superseded = registry.audit(waiting.name)[0]
    assert (superseded.to_state, superseded.actor) == (State.REJECTED, "trainer")
    assert f"superseded by {newest.name}" in superseded.reason
    assert registry.get(newest.name).gate_report is not None  # judged: it carries the waiting one's training
    assert registry.audit(newest.name)[0].actor in ("gate", "promotion-policy")


def test_a_newest_candidate_its_gates_reject_leaves_the_next_newest_to_be_judged(trainer_settings):
    """A candidate that overshot (say the KL bound) does not take the waiting versions trained before it down."""
    settings = trainer_settings(promotion_policy="auto", canary_min_trained_ratings=0)
    trainer, registry = _trainer(settings)
    _served_ratings(settings, 8)
    canary = trainer.consume(trainer.gather())
    _served_ratings(settings, 8)
    waiting = trainer.consume(trainer.gather())
    _served_ratings(settings, 8)
    newest = trainer.consume(trainer.gather())
    registry.reject(canary.name, actor="test", reason="test", expect=State.CANARY)
    judged, gate = [], trainer._gate

    def gate_failing_the_newest(name: str) -> None:
        judged.append(name)
        if name == newest.name:
            registry.judge(name, report={"passed": False, "gates": []}, failed=["kl"])
        else:
            gate(name)

    trainer._gate = gate_failing_the_newest
    trainer._gate_when_wanted()
    assert judged == [newest.name, waiting.name]
    assert registry.get(newest.name).state == State.REJECTED
    assert registry.get(waiting.name).state in (State.APPROVED, State.CANARY)  # judged, passed, not superseded
    trainer.policy.kl_ctl.value = beta = 10 * trainer.policy.kl_ctl.value  # what the overshoot had driven β to
    trainer._follow_serving()
    trainer.consumer.close()
    assert trainer.version_name == waiting.name  # training goes on from the version that passed ...
    assert trainer.policy.kl_ctl.value == beta  # ... with the β the rejected one had reached, not its older one


def test_reward_model_mode_trains_the_reward_model_and_updates_on_fresh_rollouts_once_it_is_usable(
        trainer_settings):
    settings = trainer_settings(reward_source="reward_model", rollout={"max_tokens": 6})
    _served_ratings(settings, 8)
    trainer, registry = _trainer(settings)
    assert trainer.consume(trainer.gather()) is None  # 8 thumbs: a reward model far from usable drives nothing
    trainer.consumer.close()
    reward_versions = registry.versions(kind=Kind.REWARD)
    assert len(reward_versions) == 1 and registry.versions(kind=Kind.POLICY) == []
    assert reward_versions[0].training_metrics["usable"] is False

    # the same wiring once the reward model counts as usable (here: any model, with (almost) every thumb held out
    # so that both are there to measure)
    retuned = settings.model_copy(update={"reward_model": {"l2_grid": [2.0], "usable_z": -100.0,
                                                           "usable_min_per_thumb": 0, "heldout_fraction": 0.999}})
    events = _served_ratings(retuned, 8, alternate=True)
    restarted, registry = _trainer(retuned)  # resumes the saved reward model, trained on with the configured settings
    assert restarted.reward_model_name == reward_versions[0].name
    assert restarted.reward_model.config.l2_grid == (2.0,) and restarted.reward_model.increments == 1
    candidate = restarted.consume(restarted.gather())
    restarted.consumer.close()
    reward_versions = registry.versions(kind=Kind.REWARD)
    assert candidate is not None and len(reward_versions) == 2 and restarted.reward_model.increments == 2
    assert registry.get(candidate.name).reward_source == f"reward_model:{reward_versions[0].name}"
    prompts = len({tuple(e.prompt_token_ids) for e in events})
    assert candidate.metrics["samples"] == 4 * prompts and candidate.metrics["applied"] == 1.0  # k = 4 per prompt


def test_comparisons_are_trained_once_in_direct_mode_as_groups_of_their_answers(trainer_settings):
    settings = trainer_settings()
    ratings, comparisons = _served_ratings(settings, 3), _served_comparisons(settings, 3)
    good = comparisons[0].ranking[0].model_dump()
    unusable = _comparison("chatcmpl-bad", [ComparedCompletion(**good | {"prompt_token_ids": [10**6]}),
                                            comparisons[0].ranking[1]])
    _publish(settings, [unusable])
    trainer, registry = _trainer(settings)
    candidate = trainer.consume(trainer.gather())
    trainer.consumer.close()
    trained = {e.event_id for e in ratings if not is_heldout(e.completion_id, settings.gate_holdout_fraction,
                                                               split=GATES_SPLIT)} | {e.event_id for e in comparisons}
    assert set(registry.get(candidate.name).consumed_event_ids) == trained
    assert candidate.metrics["samples"] == len(trained) - 3 + 2 * 3  # each comparison: its two answers
    outcomes = _outcomes(trainer.sessions)
    assert outcomes[unusable.event_id] == ("dead_lettered", None)
    assert all(outcomes[e] == ("trained", candidate.name) for e in trained)
    [dead] = read_topic(settings, settings.feedback_dlq_topic, 1)
    assert "token ids outside" in dict(dead.headers)["dlq.reason"].decode()

    restarted, _ = _trainer(settings)
    assert restarted.consumer.next_batch(max_wait_s=3.0).events == []  # each consumed exactly once
    restarted.consumer.close()


def test_only_the_latest_ranking_of_a_request_is_trained_across_batches(trainer_settings):
    settings = trainer_settings()
    trainer, registry = _trainer(settings)
    _served_ratings(settings, 4)
    changed, repeated = _served_comparisons(settings, 2)
    first = trainer.consume(trainer.gather())
    assert {changed.event_id, repeated.event_id} <= set(registry.get(first.name).consumed_event_ids)

    change_of_mind = _comparison(changed.request_id, changed.ranking[::-1], revision=2)  # after training on the first
    stale = _comparison(repeated.request_id, repeated.ranking)  # the same revision again, under a new event id
    replaced, latest = (_comparison("chatcmpl-late", changed.ranking, revision=r) for r in (1, 2))
    _publish(settings, [change_of_mind, stale, replaced, latest])
    later = _served_ratings(settings, 4)
    second = trainer.consume(trainer.gather())
    trainer.consumer.close()
    outcomes = _outcomes(trainer.sessions)
    assert outcomes[change_of_mind.event_id] == outcomes[latest.event_id] == ("trained", second.name)
    assert outcomes[stale.event_id] == outcomes[replaced.event_id] == ("superseded", None)
    assert len(registry.get(second.name).consumed_event_ids) == 2 + sum(
        not is_heldout(e.completion_id, settings.gate_holdout_fraction, split=GATES_SPLIT) for e in later)


def test_a_ranking_the_feedback_service_stored_again_is_trained_instead_of_the_older(trainer_settings):
    """Through the real service and relay: a comparison re-ranked in the database before the trainer reads its first
    ranking is never trained on that first ranking."""
    settings = trainer_settings(train_batch_min=1)
    trainer, registry = _trainer(settings)
    sessions = trainer.sessions
    pairs = _compared_pairs(settings, sessions, 4)
    first_ids = _compare(settings, sessions, pairs[:3])
    [stale] = _compare(settings, sessions, [pairs[3]])  # relayed ...
    [latest] = _compare(settings, sessions, [pairs[3][::-1]], relay=False)  # ... and re-ranked before training
    first = trainer.consume(trainer.gather())
    assert sorted(registry.get(first.name).consumed_event_ids) == sorted(first_ids)
    assert _outcomes(sessions)[stale] == ("superseded", None)
    _relay(settings, sessions)
    second = trainer.consume(trainer.gather())
    trainer.consumer.close()
    assert list(registry.get(second.name).consumed_event_ids) == [latest]


def test_reward_model_mode_learns_from_comparisons_and_reports_its_accuracy_on_them(trainer_settings):
    # (almost) every comparison held out so that the accuracy is measured, and any model usable on it
    settings = trainer_settings(reward_source="reward_model", rollout={"max_tokens": 6}, reward_model={
        "l2_grid": [2.0], "usable_z": -100.0, "usable_min_comparisons": 0, "heldout_fraction": 0.999})
    metrics.REWARD_MODEL_COMPARISON_ACCURACY.set(float("nan"))
    comparisons = _served_comparisons(settings, 6)
    trainer, registry = _trainer(settings)
    candidate = trainer.consume(trainer.gather())
    trainer.consumer.close()
    [reward_model] = registry.versions(kind=Kind.REWARD)
    assert reward_model.training_metrics["n_comparisons"] == 6
    accuracy = reward_model.training_metrics["heldout_comparison_accuracy"]
    assert 0 <= accuracy <= 1 and metrics.REWARD_MODEL_COMPARISON_ACCURACY._value.get() == accuracy
    prompts = len({tuple(c.ranking[0].prompt_token_ids) for c in comparisons})
    assert candidate is not None and candidate.metrics["samples"] == 4 * prompts  # fresh answers to their prompts
    assert set(registry.get(candidate.name).consumed_event_ids) == {c.event_id for c in comparisons}


def _unusable_events(settings, template: FeedbackEvent) -> dict[str, bytes]:
    """Expected dead-letter reason -> a message with it: valid events the trainer cannot use, and NaN log-probs
    (written by Python's json; the schema refuses them)."""
    fields = template.model_dump(mode="json")

    def event(**overrides) -> bytes:
        data = fields | {"event_id": uuid.uuid4().hex, "completion_id": f"chatcmpl-{uuid.uuid4().hex}"} | overrides
        return json.dumps(data).encode()

    logprobs, params = fields["behaviour_logprobs"], fields["sampling_params"]
    return {
        "token ids outside": event(prompt_token_ids=[10**6, *fields["prompt_token_ids"]]),
        "exceed the context": event(prompt_token_ids=fields["prompt_token_ids"] * 600),
        "empty prompt or response": event(response_token_ids=[], behaviour_logprobs=[]),
        "log-probs must be finite and <= 0": event(behaviour_logprobs=[5.0] * len(logprobs)),
        "temperature 'hot'": event(sampling_params=params | {"temperature": "hot"}),
        "temperature 1e-40": event(sampling_params=params | {"temperature": 1e-40}),
        "top_p 0": event(sampling_params=params | {"top_p": 0}),
        "unexpected keyword argument 'temperatur'": event(sampling_params=params | {"temperatur": 0.7}),
        "behaviour_logprobs.0": event(behaviour_logprobs=[float("nan")] * len(logprobs)),
    }


def test_events_the_trainer_cannot_use_are_dead_lettered_and_training_goes_on(trainer_settings):
    """Each goes to the dead-letter topic with its reason and is recorded as consumed, the stored offsets cover
    it, and the valid ratings around it are trained on."""
    settings = trainer_settings()
    good = _served_ratings(settings, 4)
    unusable = _unusable_events(settings, good[0])
    publisher = Publisher(settings, "test")
    assert publisher.publish([Message(settings.feedback_topic, "bad", raw) for raw in unusable.values()]) \
        == [None] * len(unusable)
    publisher.close()
    good += _served_ratings(settings, 4)
    trainer, registry = _trainer(settings)
    candidate = trainer.train(trainer.gather())
    trainer.consumer.close()

    assert sorted(registry.get(candidate.name).consumed_event_ids) == sorted(
        e.event_id for e in good if not is_heldout(e.completion_id, settings.gate_holdout_fraction, split=GATES_SPLIT))
    reasons = [dict(r.headers)["dlq.reason"].decode() for r in read_topic(settings, settings.feedback_dlq_topic,
                                                                          len(unusable))]
    assert len(reasons) == len(unusable)
    assert all(any(expected in reason for reason in reasons) for expected in unusable), reasons
    valid = {json.loads(raw)["event_id"] for reason, raw in unusable.items() if reason != "behaviour_logprobs.0"}
    assert {e for e, (outcome, _) in _outcomes(trainer.sessions).items() if outcome == "dead_lettered"} == valid
    stored = Ledger(trainer.sessions, settings.feedback_consumer_group).offsets(settings.feedback_topic)
    assert sum(s.offset for s in stored.values()) == len(good) + len(unusable)  # every message accounted for


def _env(settings, **extra) -> dict[str, str]:
    """The process environment that gives ``liveloop`` these settings."""
    fields = ("kafka_bootstrap", "feedback_topic", "feedback_dlq_topic", "adapter_events_topic",
              "feedback_consumer_group", "kafka_request_timeout_ms", "kafka_delivery_timeout_ms",
              "kafka_session_timeout_ms", "kafka_heartbeat_interval_ms", "base_model", "database_url", "data_dir",
              "model_cache_dir", "train_batch_min", "train_batch_max", "train_poll_s", "trainer_metrics_port",
              "promotion_policy", "gate_holdout_fraction", "gate_prompts", "gate_max_new_tokens", "ppo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOOP_")}
    for name in fields:
        value = getattr(settings, name)
        env[f"LIVELOOP_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env | {f"LIVELOOP_{k.upper()}": str(v) for k, v in extra.items()}


def _train_process(settings, log_path) -> subprocess.Popen:
    with open(log_path, "ab") as output:
        return subprocess.Popen([sys.executable, "-m", "liveloop", "train"], env=_env(settings), stdout=output,
                                stderr=subprocess.STDOUT)


def test_liveloop_train_killed_then_its_broker_lost_trains_every_rating_exactly_once(trainer_settings, broker,
                                                                                     tmp_path):
    """The production wiring: `liveloop train` is killed right after registering a candidate (Kafka's commit
    may or may not have followed), ratings relayed meanwhile die with the broker; the next `liveloop train`
    keeps the candidate, republishes the ratings no version consumed, and trains each of them once."""
    settings = trainer_settings(train_batch_max=6)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
    completions = _served_completions(settings, sessions, 12)
    rated = _rate(settings, sessions, completions[:6])
    first = _train_process(settings, tmp_path / "train.log")
    try:
        wait_until(lambda: registry.versions(kind=Kind.POLICY), timeout_s=120)
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind
        first.wait()
    rated += _rate(settings, sessions, completions[6:])  # relayed to the broker ...
    broker.stop()  # ... which restarts empty
    broker.start()

    second = _train_process(settings, tmp_path / "train.log")
    try:
        wait_until(lambda: {e for e, (outcome, _) in _outcomes(sessions).items() if outcome == "trained"}
                   == set(rated), timeout_s=120)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    lineages = [e for version in registry.versions(kind=Kind.POLICY) for e in version.consumed_event_ids]
    assert sorted(lineages) == sorted(rated)  # every rating, each in exactly one version's lineage
    assert not [t for t in registry.audit() if "orphan" in t.reason]

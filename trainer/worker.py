"""The trainer process: feedback batches from Kafka → PPO update → candidate adapter → offsets → gates.

Delivery semantics. Offsets are committed only after the candidate is durably written and registered, and
each candidate records the events and the offsets it consumed. A trainer stopped between the two leaves a
candidate whose offsets are ahead of the group's: at the next start that candidate is rejected as an orphan
and its batch is trained again, so a rating is never lost and never counted twice in one version's lineage.

Lineage. The trainer's policy is one linear chain: it resumes from the newest policy version it committed,
whatever the gates made of it (a rejected candidate is kept from users, not erased from the optimisation;
the KL penalty to the base model is what pulls a policy back). The base model is version 0.

Held-out ratings (a stable hash of the completion id, ``gate_holdout_fraction``) are never trained on: the
gates estimate reward on them.
"""

from __future__ import annotations

import logging
import math
import secrets
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from kafka import TopicPartition
from sqlalchemy.orm import Session, sessionmaker

from feedback.consumer import Batch, FeedbackConsumer
from feedback.events import FeedbackEvent
from liveloop.adapters import AdapterArtifactError, verify_adapter
from liveloop.model import BaseModel
from liveloop.promotion import Promoter
from liveloop.registry import Kind, Lineage, Registry, RegistryError, State
from liveloop.sampling import SamplingParams, sequence_logprobs
from liveloop.settings import Settings
from trainer import metrics
from trainer.config import PPOConfig
from trainer.gates import Gates, judge_candidate
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.policy import POLICY_ADAPTER, PolicyValueModel
from trainer.reward_model import RatedResponse, RewardModel, RewardModelConfig
from trainer.rollout import RolloutConfig, fresh_samples
from trainer.update import Sample, ppo_update

log = logging.getLogger(__name__)

_MISMATCH_SAMPLES = 4  # logged samples per batch whose behaviour log-probs are recomputed as a check


@dataclass(frozen=True)
class Candidate:
    name: str
    events: int
    metrics: dict[str, float]


class Trainer:
    """Owns the policy (and reward model), the consumer's pending batches and the registry writes."""

    def __init__(self, settings: Settings, base: BaseModel, *, registry: Registry,
                 sessions: sessionmaker[Session], consumer: FeedbackConsumer):
        self.settings, self.base, self.registry, self.sessions = settings, base, registry, sessions
        self.consumer = consumer
        base.model.train(False)
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # candidates are written there, then stored
        self.policy, self.version_name = self._resume(PPOConfig.from_dict(settings.ppo))
        self.reward_model_name: str | None = None
        self.reward_model = self._reward_model() if settings.reward_source == "reward_model" else None
        self.gates = Gates(self.policy.model, base.tokenizer, eos_token_ids=base.eos_token_ids, settings=settings,
                           scorer=self.reward_model.score if self.reward_model else None)
        self._version_numbers: dict[str | None, int] = {None: 0}
        self._gate_pending()

    # --- the loop --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batches = self.gather(stop)
            if batches:
                self.consume(batches)

    def gather(self, stop: threading.Event | None = None) -> list[Batch]:
        """Poll until ``train_batch_min`` trainable ratings are in (or ``stop``); their batches, uncommitted."""
        batches, trainable = [], 0
        while trainable < self.settings.train_batch_min and not (stop and stop.is_set()):
            batch = self.consumer.next_batch(max_messages=self.settings.train_batch_max - trainable,
                                             max_wait_s=self.settings.train_poll_s)
            if batch.offsets:
                batches.append(batch)
                trainable += len(self._trainable(batch.events))
        return batches if trainable >= self.settings.train_batch_min else []

    def consume(self, batches: list[Batch]) -> Candidate | None:
        """Train on the batches, write the candidate, commit the offsets, then gate the candidate."""
        candidate = self.train(batches)
        self.consumer.commit(*batches)
        if candidate is not None:
            self._gate(candidate.name)
        return candidate

    def train(self, batches: list[Batch]) -> Candidate | None:
        """One PPO update on the batches' trainable ratings; the candidate is registered, offsets not committed."""
        events = self._trainable([event for batch in batches for event in batch.events])
        metrics.RATINGS.labels("trained").inc(len(events))
        if not events:
            return None
        samples = self._samples(events)
        if not samples:
            return None
        update = ppo_update(self.policy, samples)
        metrics.export_update(update)
        if not update["applied"]:
            log.warning("update not applied (%s); its %d ratings are consumed without a candidate",
                        "discarded" if update["discarded"] else "no fresh samples", len(events))
            return None
        return self._write_candidate(events, batches, update)

    # --- samples ---------------------------------------------------------------------------------------

    def _trainable(self, events: list[FeedbackEvent]) -> list[FeedbackEvent]:
        fraction = self.settings.gate_holdout_fraction
        return [e for e in events if not is_heldout(e.completion_id, fraction, split=GATES_SPLIT)]

    def _samples(self, events: list[FeedbackEvent]) -> list[Sample]:
        if self.reward_model is None:
            self._check_behaviour_logprobs(events)
            return self._logged_samples(events)
        self.reward_model.add(RatedResponse.from_event(event) for event in events)
        rm = self.reward_model.train_increment()
        # NaN, not the last (or initial 0) value, while the held-out split lacks a thumb: no number would be honest
        accuracy = rm.heldout_balanced_accuracy
        metrics.REWARD_MODEL_BALANCED_ACCURACY.set(math.nan if accuracy is None else accuracy)
        self._save_reward_model()
        prompts = {tuple(e.prompt_token_ids): SamplingParams.from_dict(e.sampling_params) for e in events}
        return fresh_samples(self.policy, self.reward_model, list(prompts), list(prompts.values()),
                             RolloutConfig(**self.settings.rollout), eos_token_ids=self.base.eos_token_ids)

    def _logged_samples(self, events: list[FeedbackEvent]) -> list[Sample]:
        """Served samples as PPO samples; those of a version outside this trainer's lineage are dropped (their
        staleness is unknown), the rest carry their version for the update's staleness bound."""
        samples = []
        for event in events:
            version = self._version_number(event.adapter_version)
            if version is None or version > self.policy.version:
                metrics.RATINGS.labels("foreign_version").inc()
                continue
            samples.append(Sample(
                prompt_ids=event.prompt_token_ids, response_ids=event.response_token_ids,
                behaviour_logprobs=event.behaviour_logprobs, version=version, score=event.reward,
                temperature=float(event.sampling_params.get("temperature", 1.0))))
        return samples

    def _version_number(self, name: str | None) -> int | None:
        """The PPO version number of a served adapter version (the base model is 0); None when unknown."""
        if name not in self._version_numbers:
            try:
                path = self.registry.artifact(name, base_model_id=self.base.model_id)
                self._version_numbers[name] = int(verify_adapter(path)["metadata"]["ppo"]["version"])
            except (RegistryError, AdapterArtifactError, KeyError) as exc:
                log.warning("samples served by %s are not trained on: %s", name, exc)
                self._version_numbers[name] = None
        return self._version_numbers[name]

    @torch.no_grad()
    def _check_behaviour_logprobs(self, events: list[FeedbackEvent]) -> None:
        """The training–inference invariant, measured: samples served by this very version, recomputed."""
        own = [e for e in events if e.adapter_version == self.version_name][:_MISMATCH_SAMPLES]
        if not own:
            return
        adapter = POLICY_ADAPTER if self.version_name else None
        gaps = []
        for event in own:
            recomputed = sequence_logprobs(self.policy.model, event.prompt_token_ids, event.response_token_ids,
                                           SamplingParams.from_dict(event.sampling_params), adapter=adapter)
            gaps += [abs(a - b) for a, b in zip(recomputed, event.behaviour_logprobs, strict=True)]
        metrics.BEHAVIOUR_MISMATCH.set(sum(gaps) / len(gaps))

    # --- versions --------------------------------------------------------------------------------------

    def _write_candidate(self, events: list[FeedbackEvent], batches: list[Batch], update: dict) -> Candidate:
        name = f"policy-{self.policy.version:05d}-{secrets.token_hex(3)}"
        source = f"reward_model:{self.reward_model_name}" if self.reward_model else "direct"
        lineage = Lineage(parent=self.version_name, reward_source=source,
                          event_ids=tuple(e.event_id for e in events), kafka_offsets=_offsets(batches))
        with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:
            self.policy.save(Path(tmp) / name, metadata={"lineage": asdict(lineage)})
            self.registry.register(name, Path(tmp) / name, lineage=lineage, training_metrics=update)
        metrics.CANDIDATES.inc()
        log.info("candidate %s from %d ratings: reward %.3f kl %.4f β %.3f", name, len(events),
                 update["reward_mean"], update["kl"], update["beta"])
        self.version_name = name
        self._version_numbers[name] = self.policy.version
        return Candidate(name, len(events), update)

    def _resume(self, config: PPOConfig) -> tuple[PolicyValueModel, str | None]:
        """The newest committed policy version (orphans rejected on the way), or a fresh adapter."""
        for version in self.registry.versions(kind=Kind.POLICY):
            if version.state == State.REJECTED and version.gate_report is None:
                continue  # an orphan of an earlier start
            if self._ahead_of_commits(version.kafka_offsets):
                self.registry.reject(version.name, actor="trainer", reason="orphan: the trainer stopped before "
                                     "committing its feedback offsets; the batch is trained again")
                continue
            path = self.registry.artifact(version.name, base_model_id=self.base.model_id)
            log.info("resuming from %s", version.name)
            return PolicyValueModel.load(self.base.model, path, config, base_model_id=self.base.model_id), version.name
        return PolicyValueModel.create(self.base.model, config, base_model_id=self.base.model_id), None

    def _ahead_of_commits(self, offsets: dict[str, int]) -> bool:
        partitions = {key: TopicPartition(*_split(key)) for key in offsets}
        committed = self.consumer.committed(partitions.values())
        return any(offset > committed[partitions[key]] for key, offset in offsets.items())

    def _reward_model(self) -> RewardModel:
        config = RewardModelConfig(**self.settings.reward_model)
        pad = self.base.tokenizer.pad_token_id
        newest = self.registry.versions(kind=Kind.REWARD)
        self.reward_model_name = newest[0].name if newest else None
        if newest:
            path = self.registry.artifact(newest[0].name, base_model_id=self.base.model_id)
            # the configured hyper-parameters train from here on, as the policy's do (the LoRA shape must match)
            return RewardModel.load(self.policy.model, path, base_model_id=self.base.model_id, pad_token_id=pad,
                                    config=config)
        return RewardModel.create(self.policy.model, base_model_id=self.base.model_id, pad_token_id=pad,
                                  config=config)

    def _save_reward_model(self) -> None:
        name = f"reward-{self.reward_model.increments:05d}-{secrets.token_hex(3)}"
        with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:
            self.reward_model.save(Path(tmp) / name)
            self.registry.register(name, Path(tmp) / name, kind=Kind.REWARD,
                                   training_metrics=self.reward_model.last_metrics.__dict__)
        self.reward_model_name = name

    def _gate(self, name: str) -> None:
        report = judge_candidate(self.registry, self.gates, self.sessions, name, base_model_id=self.base.model_id)
        if report is not None:
            Promoter(self.registry, self.settings).after_gates(name)

    def _gate_pending(self) -> None:
        """Candidates registered but never judged (the trainer stopped while gating) are judged now."""
        for version in self.registry.versions(kind=Kind.POLICY, states=[State.CANDIDATE]):
            self._gate(version.name)


def recently_consumed_event_ids(registry: Registry, versions: int = 100) -> list[str]:
    """Event ids the newest policy versions trained on: the relay delivers at least once, so a repeat of one can
    arrive after the offsets that covered it were committed; seeding the consumer's dedup drops it."""
    return [event_id for version in registry.versions(kind=Kind.POLICY)[:versions]
            for event_id in version.consumed_event_ids]


def _offsets(batches: list[Batch]) -> dict[str, int]:
    offsets: dict[str, int] = {}
    for batch in batches:
        for tp, offset in batch.offsets.items():
            key = f"{tp.topic}:{tp.partition}"
            offsets[key] = max(offsets.get(key, 0), offset)
    return offsets


def _split(key: str) -> tuple[str, int]:
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)

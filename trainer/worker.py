"""The trainer process: feedback batches from Kafka → PPO update → candidate adapter → offsets → gates.

Delivery semantics. The database, not the broker, records what was consumed (``feedback.ledger``): a batch's
next offsets and the outcome of each of its ratings are written in the transaction that registers its
candidate, or in one of their own when the batch yields none (all held out or superseded, no samples, update
not applied). The consumer seeks to those offsets whenever it is assigned a partition and never reads Kafka's
committed offsets (the commit that follows is a courtesy for lag monitoring). So a trainer stopped anywhere
trains a batch exactly once: before the transaction nothing of it is stored and it is read again; after it,
the batch is behind the stored offsets, and a repeat delivered anyway is dropped by event id against the
database. When the broker has lost records (a restarted embedded broker, expired retention, a new cluster), the
consumer republishes from the outbox every rating not recorded as consumed.

Changes of mind. Only a completion's latest rating is trained on: a rating is recorded as superseded, never
trained, when a newer revision of its completion is in the ``feedback`` table or was consumed before (and
within a batch only the highest revision counts). A revision that arrives after an older one of the same
completion was trained is trained in a later update with its own, new sign: the earlier update cannot be
undone, so the newest step follows the user's latest opinion, and each completion's revisions are trained in
increasing order, at most once each.

Lineage. Each update starts from the newest version not known to be bad: the newest of the live (promoted),
canary, approved and not yet judged policy versions, the base model (version 0) when there is none. Never from a
rejected, rolled-back or retired version: after a rejection or a rollback the next update starts again from the
live version, or from a newer one that serves, may serve, or waits for its gates. The chain cannot stall: ratings
of whatever version served them are trained on (importance-weighted, ``trainer.ppo``), so each batch can yield
a candidate.

Gates when they are wanted. A gate run costs about as much as an update, and an approved version is of use only
when the canary slot can take it (``Promoter.wants_candidate``: no canary, or one undecided half-way to giving
way). So a candidate is judged then: the newest waiting one, at once if the slot is free; the older ones waiting
are rejected unjudged ("superseded before its gates ran"), the newest carries their training. While a canary
holds the slot the trainer keeps training instead of judging versions nobody would serve.

Held-out ratings (a stable hash of the completion id, ``gate_holdout_fraction``) are never trained on: the
gates estimate reward on them.

Comparisons (a ranking of the answers to one request) are consumed on the same terms: exactly once, the latest
revision of each request only (``feedback.ledger.subject``), held out when any of their answers is, dead-lettered
when one cannot be trained on. In ``reward_model`` mode each adds Bradley–Terry pairs to the reward model's data
beside the thumbs, and its prompt to those PPO samples fresh responses for. In ``direct`` mode its answers are
logged samples of one RLOO group, the preferred one scored above the others (``trainer.samples.compared_samples``).

Events that are valid but cannot be trained on (``trainer.samples.check_trainable``: tokens outside the
vocabulary, a bad temperature, ...) go to the dead-letter topic with the reason, and are recorded as consumed
(``dead_lettered``) with their batch; training goes on.
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
from kafka.errors import KafkaError
from peft import set_peft_model_state_dict
from sqlalchemy.orm import Session, sessionmaker

from feedback.consumer import Batch, FeedbackConsumer
from feedback.events import ComparisonEvent, FeedbackEvent
from feedback.ledger import Event, Outcome
from liveloop.adapter_artifacts import AdapterArtifactError, read_adapter, verify_adapter
from liveloop.model import LoadedModel
from liveloop.promotion import Promoter
from liveloop.registry import Kind, Lineage, Registry, RegistryError, State
from liveloop.sampling import SamplingParams, sequence_logprobs
from liveloop.settings import Settings
from trainer import metrics
from trainer.config import PPOConfig
from trainer.gates import Gates, judge_candidate
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.policy import POLICY_ADAPTER, Policy
from trainer.ppo import AdaptiveKLController, RunningMoments
from trainer.reward_model import RankedResponses, RatedResponse, RewardModel, RewardModelConfig
from trainer.rollout import RolloutConfig, fresh_samples
from trainer.samples import check_trainable, compared_samples, logged_sample, served
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

    def __init__(self, settings: Settings, base: LoadedModel, *, registry: Registry,
                 sessions: sessionmaker[Session], consumer: FeedbackConsumer):
        self.settings, self.base, self.registry, self.sessions = settings, base, registry, sessions
        self.consumer, self.ledger = consumer, consumer.ledger
        assert self.ledger is not None, "the trainer's consumer seeks to the offsets stored in the database"
        base.model.train(False)
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # candidates are written there, then stored
        self._version_numbers: dict[str | None, int] = {None: 0}
        self.policy, self.version_name = self._resume(PPOConfig.from_dict(settings.ppo))
        self.reward_model_name: str | None = None
        self.reward_model = self._reward_model() if settings.reward_source == "reward_model" else None
        self.gates = Gates(self.policy.model, base.tokenizer, eos_token_ids=base.eos_token_ids, settings=settings,
                           scorer=self.reward_model.score if self.reward_model else None)
        self._gate_when_wanted()
        self._follow_serving()  # a pending candidate rejected just now is not where training goes on

    # --- the loop --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batches = self.gather(stop)
            if batches:
                self.consume(batches)

    @metrics.STAGE_SECONDS.labels("gather").time()
    def gather(self, stop: threading.Event | None = None) -> list[Batch]:
        """Poll until ``train_batch_min`` trainable ratings are in (or ``stop``); their batches, uncommitted."""
        batches, trainable = [], 0
        while trainable < self.settings.train_batch_min and not (stop and stop.is_set()):
            self._gate_when_wanted()  # the canary slot may free up while ratings are awaited
            batch = self.consumer.next_batch(max_messages=self.settings.train_batch_max - trainable,
                                             max_wait_s=self.settings.train_poll_s,
                                             check=lambda event: check_trainable(event, self.policy))
            if batch.offsets:
                batches.append(batch)
                trainable += len(self._trainable(batch.events))
        return batches if trainable >= self.settings.train_batch_min else []

    def consume(self, batches: list[Batch]) -> Candidate | None:
        """Train on the batches (the candidate and the consumed offsets stored together), then gate it."""
        candidate = self.train(batches)
        try:  # a courtesy to lag monitoring: the offsets that count are in the database already
            self.consumer.commit(*batches)
        except KafkaError as exc:
            log.info("Kafka commit skipped (%s); the database has the offsets", exc)
        self._gate_when_wanted()
        return candidate

    @metrics.STAGE_SECONDS.labels("train").time()
    def train(self, batches: list[Batch]) -> Candidate | None:
        """One PPO update on the batches' trainable latest ratings, from the version ``_start_point`` names; the
        candidate is registered with the consumed offsets and ratings, or these are stored alone."""
        offsets = self.consumer.offsets_of(*batches)
        fresh, stale = self.ledger.settle([event for batch in batches for event in batch.events])
        superseded = [event for batch in batches for event in batch.superseded] + stale
        events = self._trainable(fresh)
        trainable = {e.event_id for e in events}
        consumed = [(e, Outcome.SUPERSEDED) for e in superseded] + [
            (e, Outcome.HELDOUT) for e in fresh if e.event_id not in trainable] + [
            (e, Outcome.DEAD_LETTERED) for batch in batches for e in batch.rejected]
        metrics.RATINGS.labels("trained").inc(len(events))
        update = self._update(events) if events else None
        if update is None or not update["applied"]:
            self.ledger.save(offsets=offsets, consumed=consumed + [(e, Outcome.DISCARDED) for e in events])
            if events:
                log.warning("no update (%s); its %d ratings are consumed without a candidate",
                            "discarded" if update and update["discarded"] else "no samples", len(events))
            return None
        return self._write_candidate(events, offsets, update, consumed)

    def _update(self, events: list[FeedbackEvent]) -> dict | None:
        self._follow_serving()
        samples = self._samples(events)
        if not samples:
            return None
        update = ppo_update(self.policy, samples)
        metrics.export_update(update)
        return update

    # --- samples ---------------------------------------------------------------------------------------

    def _trainable(self, events: list[Event]) -> list[Event]:
        fraction = self.settings.gate_holdout_fraction
        return [e for e in events if not any(is_heldout(c.completion_id, fraction, split=GATES_SPLIT)
                                             for c in served(e))]

    def _samples(self, events: list[Event]) -> list[Sample]:
        if self.reward_model is None:
            self._check_behaviour_logprobs(events)
            return self._logged_samples(events)
        self.reward_model.add(self._reward_model_examples(events))
        rm = self.reward_model.train_increment()
        # NaN, not the last (or initial 0) value, while the held-out split lacks a thumb: no number would be honest
        accuracy = rm.heldout_balanced_accuracy
        metrics.REWARD_MODEL_BALANCED_ACCURACY.set(math.nan if accuracy is None else accuracy)
        metrics.REWARD_MODEL_AUC.set(math.nan if rm.heldout_auc is None else rm.heldout_auc)
        comparisons = rm.heldout_comparison_accuracy
        metrics.REWARD_MODEL_COMPARISON_ACCURACY.set(math.nan if comparisons is None else comparisons)
        self._save_reward_model()
        if not rm.usable:  # a reward model at chance would teach the policy noise: its ratings only train it
            log.info("reward model not usable yet (held-out AUC %s, lower bound %s): no policy update",
                     rm.heldout_auc, rm.heldout_auc_low)
            metrics.RATINGS.labels("reward_model_only").inc(len(events))
            return []
        served_first = (served(e)[0] for e in events)  # a comparison's answers share their prompt
        prompts = {tuple(c.prompt_token_ids): SamplingParams.from_dict(c.sampling_params) for c in served_first}
        return fresh_samples(self.policy, self.reward_model, list(prompts), list(prompts.values()),
                             RolloutConfig(**self.settings.rollout), eos_token_ids=self.base.eos_token_ids)

    def _logged_samples(self, events: list[Event]) -> list[Sample]:
        """Served samples as PPO samples, whichever version served them: the importance weights correct for the
        gap between that version and the policy (``trainer.ppo``), so none is dropped for its age. The answers of
        a comparison form one group of their own."""
        ratings = [logged_sample(e, e.reward) for e in events if isinstance(e, FeedbackEvent)]
        comparisons = [e for e in events if isinstance(e, ComparisonEvent)]
        centre = self.policy.moments.mean
        return ratings + [s for group, e in enumerate(comparisons) for s in compared_samples(e, group, centre)]

    @staticmethod
    def _reward_model_examples(events: list[Event]) -> list[RatedResponse | RankedResponses]:
        return [RankedResponses.from_event(e) if isinstance(e, ComparisonEvent) else RatedResponse.from_event(e)
                for e in events]

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
    def _check_behaviour_logprobs(self, events: list[Event]) -> None:
        """The training–inference invariant, measured: samples served by this very version, recomputed."""
        own = [c for e in events for c in served(e) if c.adapter_version == self.version_name][:_MISMATCH_SAMPLES]
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

    def _write_candidate(self, events: list[FeedbackEvent], offsets: dict[TopicPartition, int], update: dict,
                         consumed: list[tuple[FeedbackEvent, Outcome]]) -> Candidate:
        """Store the candidate and register it, with the consumed offsets and ratings in the same transaction."""
        name = f"policy-{self.policy.version:05d}-{secrets.token_hex(3)}"
        source = f"reward_model:{self.reward_model_name}" if self.reward_model else "direct"
        lineage = Lineage(parent=self.version_name, reward_source=source,
                          event_ids=tuple(e.event_id for e in events), kafka_offsets=_offsets(offsets))
        consumed = consumed + [(event, Outcome.TRAINED) for event in events]
        with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:
            self.policy.save(Path(tmp) / name, metadata={"lineage": asdict(lineage)})
            self.registry.register(name, Path(tmp) / name, lineage=lineage, training_metrics=update,
                                   also=lambda session: self.ledger.record(session, offsets=offsets,
                                                                           consumed=consumed, version=name))
        metrics.CANDIDATES.inc()
        log.info("candidate %s from %d ratings: reward %.3f kl %.4f β %.3f", name, len(events),
                 update["reward_mean"], update["kl"], update["beta"])
        self.version_name = name
        self._version_numbers[name] = self.policy.version
        return Candidate(name, len(events), update)

    def _resume(self, config: PPOConfig) -> tuple[Policy, str | None]:
        """The policy at ``_start_point``: a stored version, or a fresh adapter (the base model)."""
        name = self._start_point()
        if name is None:
            return Policy.create(self.base.model, config, base_model_id=self.base.model_id), None
        path = self.registry.artifact(name, base_model_id=self.base.model_id)
        log.info("resuming from %s", name)
        return Policy.load(self.base.model, path, config, base_model_id=self.base.model_id), name

    def _start_point(self) -> str | None:
        """The version the next update starts from (module docstring, Lineage); None: the base model."""
        newest = self.registry.versions(kind=Kind.POLICY, limit=1, states=[
            State.PROMOTED, State.CANARY, State.APPROVED, State.CANDIDATE])
        return newest[0].name if newest else None

    def _follow_serving(self) -> None:
        """Move the policy to ``_start_point`` when that is not where it is (a rejection, a rollback)."""
        start = self._start_point()
        if start != self.version_name:
            log.info("training continues from %s instead of %s", start or "the base model",
                     self.version_name or "the base model")
            beta = self.policy.kl_ctl.value
            self._restore(start)
            # β keeps the higher of the two: a version trained past the KL bound and rejected must not be followed
            # by the same training with the β that let it overshoot (an older version carries an older, lower β)
            self.policy.kl_ctl.value = max(self.policy.kl_ctl.value, beta)
            self.version_name = start

    def _restore(self, name: str | None) -> None:
        """Load version ``name``'s adapter weights, version, β and score moments into the policy in place (the
        gates and the reward model share its peft model); None: a fresh adapter, the base model's function (the
        moments, which describe the ratings rather than the weights, stay). Adam's moments start afresh, as after
        a restart."""
        policy = self.policy
        if name is None:
            for module in policy.model.modules():
                if POLICY_ADAPTER in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters(POLICY_ADAPTER, True)
            version, kl_coef = 0, None
        else:
            path = self.registry.artifact(name, base_model_id=self.base.model_id)
            weights = read_adapter(path, base_model_id=self.base.model_id)
            set_peft_model_state_dict(policy.model, weights.tensors, adapter_name=POLICY_ADAPTER)
            ppo = weights.manifest["metadata"]["ppo"]
            version, kl_coef = ppo["version"], ppo["kl_coef"]
            if "moments" in ppo:
                policy.moments = RunningMoments(policy.config.baseline_window, **ppo["moments"])
        policy.version = version
        policy.kl_ctl = AdaptiveKLController.from_config(policy.config, kl_coef)
        policy.optimizer.state.clear()

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
        with metrics.STAGE_SECONDS.labels("gate").time():
            report = judge_candidate(self.registry, self.gates, self.sessions, name, base_model_id=self.base.model_id)
        if report is not None:
            with metrics.STAGE_SECONDS.labels("decide").time():
                Promoter(self.registry, self.settings).after_gates(name)

    def _gate_when_wanted(self) -> None:
        """Judge the newest waiting candidate when the promotion could use it (module docstring); if its gates
        reject it, the next newest, and so on: a candidate that overshot the KL bound must not take the versions
        trained before it down with it. The ones older than the first that passes are rejected unjudged."""
        waiting = self.registry.versions(kind=Kind.POLICY, states=[State.CANDIDATE])  # newest first
        if not waiting or not Promoter(self.registry, self.settings).wants_candidate():
            return
        for judged, version in enumerate(waiting):
            self._gate(version.name)
            if self.registry.get(version.name).state != State.REJECTED:
                for older in waiting[judged + 1:]:
                    self.registry.reject(older.name, actor="trainer", expect=State.CANDIDATE,
                                         reason=f"superseded by {version.name} before its gates ran")
                return


def _offsets(offsets: dict[TopicPartition, int]) -> dict[str, int]:
    """The lineage's form: '<topic>:<partition>' -> next offset."""
    return {f"{tp.topic}:{tp.partition}": offset for tp, offset in offsets.items()}

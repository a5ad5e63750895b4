"""Evaluation gates: a candidate adapter reaches users only when it passes every one of them.

1. ``reward``: on held-out live prompts (completions whose id falls in the held-out split, which the trainer
   never trains on), the candidate's reward minus the live version's is at least −ε.
   - With a reward model (``scorer``): the mean score of each version's greedy responses to the prompts.
   - In direct mode there is no scorer, so the value is an off-policy estimate of each version's thumbs-up rate
     from the logged, rated held-out samples: self-normalised importance sampling with truncated weights,
     ``w_i = min(π(y_i|x_i) / b(y_i|x_i), W_MAX)``, ``rate = Σ w_i·up_i / Σ w_i``, where ``b`` is the
     behaviour log-prob recorded at serving time and ``π`` is recomputed under the same sampling parameters
     with ``liveloop.sampling``. Truncation trades a little bias for bounded variance; the effective sample
     size is reported. With fewer than ``gate_reward_min_samples`` rated samples the gate is skipped (passes,
     marked ``skipped``): the canary on live thumbs still stands between the candidate and most users.
2. ``kl``: mean per-token KL(candidate ‖ base), exact over the vocabulary, along the candidate's greedy
   responses to the held-out prompts, ≤ ``gate_max_kl``.
3. ``perplexity``: on ``liveloop/data/reference.txt`` ≤ (1 + δ) × the base model's.
4. Generation sanity, on the same greedy responses, each against the base model's responses to the same
   prompts (greedy decoding makes that comparison exact): ``empty_outputs`` (prompts the candidate answers
   with nothing but whitespace where the base does not) = 0; ``repetition`` (share of repeated token trigrams)
   and ``length_limit_hits`` (share of responses cut at the token limit) within margins of the base's.
5. ``weights``: every adapter tensor finite and max ‖ΔW‖_F / ‖W‖_F over the adapted projections bounded.
   Non-finite weights fail the run at once; the other gates are then reported as skipped.

One base model: the candidate (and the live version) are loaded as extra peft adapters into the trainer's own
``PeftModel`` for the run and deleted after it; "base" is that model with adapters disabled. The adapter that
was active, its ``requires_grad`` flags and the train/eval mode are as before when ``evaluate`` returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from sqlalchemy import and_, select
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedTokenizerBase

from liveloop.adapter_artifacts import AdapterArtifactError
from liveloop.engine.offline import Generation, generate
from liveloop.registry import Registry, current_rating
from liveloop.sampling import SamplingParams, sampling_logprobs, sequence_logprobs, token_logprobs
from liveloop.settings import Settings
from liveloop.tables import Completion, Feedback
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.reward_model import adapter_active
from trainer.tokens import left_pad, position_ids

log = logging.getLogger(__name__)

CANDIDATE, LIVE = "gate-candidate", "gate-live"  # names of the adapters loaded for a run
DATA = resources.files("liveloop") / "data"  # the reference text and fallback prompts shipped in the package
W_MAX = 20.0  # importance-weight truncation of the direct-mode reward estimate
_PPL_WINDOW = 256  # reference-text tokens per perplexity forward
_CHUNK = 8  # sequences per forward when recomputing logits (bounds the (B, T, V) logits tensor)
_AFTER_WEIGHTS = ("reward", "kl", "perplexity", "empty_outputs", "repetition", "length_limit_hits")

Scorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]  # (prompts, responses) → (B,)


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None  # None: not measured (details say why)
    threshold: float | None
    passed: bool
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GateReport:
    results: tuple[GateResult, ...]

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"passed": self.passed, "gates": [asdict(r) for r in self.results]}


@dataclass(frozen=True)
class LoggedSample:
    """A served, rated held-out completion: what the direct-mode reward estimate reweights."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    sampling: SamplingParams
    thumbs_up: bool


@dataclass(frozen=True)
class HeldOut:
    prompts: list[tuple[int, ...]]  # chat-templated prompt token ids
    rated: list[LoggedSample]


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier one (0 for fewer than n tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def importance_weighted_rate(log_ratio: torch.Tensor, thumbs_up: torch.Tensor) -> tuple[float | None, float]:
    """Self-normalised, truncated importance-sampling estimate of a thumbs-up rate, and its effective sample size.

    log_ratio (N,): log π(y|x) − log b(y|x) per logged sample; thumbs_up (N,) in {0, 1}. None when no sample has
    support under π.
    """
    w = log_ratio.double().exp().clamp(max=W_MAX)  # (N,)
    if w.sum() <= 0:
        return None, 0.0
    return float((w * thumbs_up).sum() / w.sum()), float(w.sum() ** 2 / (w**2).sum())


def relative_delta_norm(layer: LoraLayer, adapter: str) -> float:
    """‖scaling·B A‖_F / ‖W‖_F without forming B A: ‖BA‖²_F = Σ (BᵀB) ∘ (AAᵀ), two (r, r) matrices."""
    a = layer.lora_A[adapter].weight.double()  # (r, in)
    b = layer.lora_B[adapter].weight.double()  # (out, r)
    delta = layer.scaling[adapter] * ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()
    return float(delta / layer.get_base_layer().weight.double().norm())


def _gate(name: str, value: float | None, threshold: float | None, passed: bool, **details) -> GateResult:
    """A result whose numbers survive JSON (PostgreSQL refuses NaN and infinity in JSON)."""
    if value is not None and not math.isfinite(value):
        value, passed, details = None, False, {**details, "non_finite": repr(value)}
    return GateResult(name, value, threshold, passed, details)


class Gates:
    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, *, eos_token_ids: set[int],
                 settings: Settings, scorer: Scorer | None = None):
        self.model, self.tokenizer, self.settings, self.scorer = model, tokenizer, settings, scorer
        self.eos_token_ids = eos_token_ids
        ids = tokenizer((DATA / "reference.txt").read_text())["input_ids"]
        self._reference = [torch.tensor([ids[i:i + _PPL_WINDOW]]) for i in range(0, len(ids) - 1, _PPL_WINDOW)]
        self._fallback_prompts = [
            tuple(tokenizer.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
            for line in (DATA / "prompts.txt").read_text().splitlines() if line.strip()
        ]
        self._base_ppl: float | None = None
        self._base_generations: tuple[list[tuple[int, ...]], list[Generation]] | None = None

    def evaluate(self, candidate: Path, *, live: Path | None, heldout: HeldOut) -> GateReport:
        """Run every gate on the adapter in ``candidate`` against ``live`` (None: the base model is live)."""
        prompts = self._prompts(heldout.prompts)
        training = self.model.training
        try:
            with torch.no_grad(), self._loaded(candidate, CANDIDATE), self._loaded(live, LIVE):
                self.model.eval()
                return self._run(prompts, heldout.rated, live=LIVE if live is not None else None)
        finally:
            self.model.train(training)

    def _run(self, prompts: list[tuple[int, ...]], rated: list[LoggedSample], live: str | None) -> GateReport:
        weights = self._weights()
        if weights.details.get("finite") is False:
            skipped = [GateResult(name, None, None, False, {"skipped": "weights are not finite"})
                       for name in _AFTER_WEIGHTS]
            return GateReport((*skipped, weights))
        base_perplexity, base = self._base_perplexity(), self._base(prompts)
        with self._adapter(CANDIDATE):
            candidate = self._generate(prompts)
            perplexity = self._perplexity()
        threshold = (1 + self.settings.gate_perplexity_delta) * base_perplexity
        return GateReport((
            self._reward(prompts, candidate, rated, live),
            self._kl(candidate),
            _gate("perplexity", perplexity, threshold, perplexity <= threshold, base=base_perplexity),
            *self._sanity(candidate, base),
            weights,
        ))

    # --- gates ----------------------------------------------------------------------------------------

    def _reward(self, prompts: list[tuple[int, ...]], candidate: list[Generation], rated: list[LoggedSample],
                live: str | None) -> GateResult:
        epsilon = self.settings.gate_reward_epsilon
        if self.scorer is not None:
            if live is None:
                live_generations = self._base(prompts)
            else:
                with self._adapter(live):
                    live_generations = self._generate(prompts)
            ours, theirs = (float(self.scorer(prompts, [g.response_ids for g in gens]).mean())
                            for gens in (candidate, live_generations))
            return _gate("reward", ours - theirs, -epsilon, ours - theirs >= -epsilon, mode="reward_model",
                         candidate=ours, live=theirs, prompts=len(prompts))
        if len(rated) < self.settings.gate_reward_min_samples:
            return GateResult("reward", None, -epsilon, True, {
                "mode": "direct", "skipped": f"{len(rated)} rated held-out samples, "
                f"{self.settings.gate_reward_min_samples} needed"})
        behaviour = torch.tensor([sum(s.behaviour_logprobs) for s in rated], dtype=torch.float64)
        thumbs = torch.tensor([float(s.thumbs_up) for s in rated], dtype=torch.float64)
        (ours, ess), (theirs, live_ess) = (
            importance_weighted_rate(self._sequence_logprobs(adapter, rated) - behaviour, thumbs)
            for adapter in (CANDIDATE, live))
        if ours is None or theirs is None:
            return GateResult("reward", None, -epsilon, True, {
                "mode": "direct", "skipped": "no rated sample is possible under both versions"})
        return _gate("reward", ours - theirs, -epsilon, ours - theirs >= -epsilon, mode="direct", candidate=ours,
                     live=theirs, samples=len(rated), ess=ess, live_ess=live_ess)

    def _kl(self, candidate: list[Generation]) -> GateResult:
        """Mean over response tokens of KL(π_candidate(·|prefix) ‖ π_base(·|prefix)), in nats."""
        prompts, responses = [g.prompt_ids for g in candidate], [g.response_ids for g in candidate]
        total, count = 0.0, 0
        for start in range(0, len(prompts), _CHUNK):
            chunk = slice(start, start + _CHUNK)
            with self._adapter(CANDIDATE):
                ours = self._response_logits(prompts[chunk], responses[chunk])
            with self._adapter(None):
                theirs = self._response_logits(prompts[chunk], responses[chunk])
            for p_logits, q_logits in zip(ours, theirs, strict=True):  # (T, V) each
                ones = torch.ones(len(p_logits))
                logp, logq = sampling_logprobs(p_logits, ones, ones), sampling_logprobs(q_logits, ones, ones)
                total += float((logp.exp() * (logp - logq)).sum())
                count += len(p_logits)
        kl = total / max(count, 1)
        return _gate("kl", kl, self.settings.gate_max_kl, kl <= self.settings.gate_max_kl, tokens=count)

    def _sanity(self, candidate: list[Generation], base: list[Generation]) -> list[GateResult]:
        s = self.settings
        empty = sum(self._is_empty(c) and not self._is_empty(b) for c, b in zip(candidate, base, strict=True))
        repetition, base_repetition = (_mean([repetition_rate(g.response_ids) for g in gens])
                                       for gens in (candidate, base))
        hits, base_hits = (_mean([g.finish_reason == "length" for g in gens]) for gens in (candidate, base))
        repetition_max = base_repetition + s.gate_repetition_margin
        hits_max = base_hits + s.gate_length_hit_margin
        return [
            _gate("empty_outputs", empty, 0, empty == 0, prompts=len(candidate)),
            _gate("repetition", repetition, repetition_max, repetition <= repetition_max, base=base_repetition),
            _gate("length_limit_hits", hits, hits_max, hits <= hits_max, base=base_hits,
                  max_new_tokens=s.gate_max_new_tokens),
        ]

    def _weights(self) -> GateResult:
        tensors = [p for n, p in self.model.named_parameters() if f".{CANDIDATE}." in n]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        ratios = {name: relative_delta_norm(m, CANDIDATE) for name, m in self.model.named_modules()
                  if finite and isinstance(m, LoraLayer) and CANDIDATE in m.lora_A}
        worst = max(ratios, key=ratios.get, default=None)
        value = ratios[worst] if worst is not None else (0.0 if finite else None)
        bound = self.settings.gate_max_delta_norm
        return _gate("weights", value, bound, finite and value is not None and value <= bound, finite=finite,
                     tensors=len(tensors), worst_module=worst)

    # --- measurements ---------------------------------------------------------------------------------

    def _generate(self, prompts: list[tuple[int, ...]]) -> list[Generation]:
        greedy = SamplingParams(temperature=0.0, max_tokens=self.settings.gate_max_new_tokens)
        return generate(self.model, prompts, [greedy] * len(prompts), eos_token_ids=self.eos_token_ids,
                        generator=torch.Generator().manual_seed(0))

    def _base(self, prompts: list[tuple[int, ...]]) -> list[Generation]:
        """The base model's greedy responses, remembered for the last prompt set (it changes slowly)."""
        if self._base_generations is None or self._base_generations[0] != prompts:
            with self._adapter(None):
                self._base_generations = (prompts, self._generate(prompts))
        return self._base_generations[1]

    def _base_perplexity(self) -> float:
        if self._base_ppl is None:  # the base never changes: measured once
            with self._adapter(None):
                self._base_ppl = self._perplexity()
        return self._base_ppl

    def _perplexity(self) -> float:
        """exp(mean negative log-likelihood) of the reference text under the active adapter."""
        nll, count = 0.0, 0
        for window in self._reference:  # (1, W)
            logits = self.model(input_ids=window.to(self.model.device)).logits  # (1, W, V)
            logp = token_logprobs(logits[:, :-1], window[:, 1:].to(logits.device))  # (1, W-1)
            nll, count = nll - float(logp.sum()), count + logp.numel()
        return math.exp(nll / count)

    def _sequence_logprobs(self, adapter: str | None, samples: list[LoggedSample]) -> torch.Tensor:
        """log π(y|x) (N,) of each logged response under its own sampling parameters, as serving sampled it."""
        return torch.tensor([sum(sequence_logprobs(self.model, list(s.prompt_ids), list(s.response_ids), s.sampling,
                                                   adapter)) for s in samples], dtype=torch.float64)

    def _response_logits(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                         ) -> list[torch.Tensor]:
        """Logits (T_i, V) predicting each response token, from one left-padded forward of prompt + response."""
        input_ids, attention_mask = left_pad([[*p, *r] for p, r in zip(prompts, responses, strict=True)],
                                             self._pad)  # (B, W); every row ends in column W-1
        keep = max(len(r) for r in responses) + 1
        device = self.model.device
        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            position_ids=position_ids(attention_mask).to(device),
                            logits_to_keep=keep).logits.float().cpu()  # (B, keep, V)
        return [logits[row, keep - 1 - len(r):keep - 1] for row, r in enumerate(responses)]

    # --- plumbing -------------------------------------------------------------------------------------

    @contextmanager
    def _loaded(self, path: Path | None, name: str) -> Iterator[None]:
        if path is None:
            yield
            return
        self.model.load_adapter(path, adapter_name=name)
        try:
            yield
        finally:
            self.model.delete_adapter(name)

    def _adapter(self, name: str | None):
        """Run under adapter ``name``, or the base model (adapters disabled) for None."""
        return self.model.disable_adapter() if name is None else adapter_active(self.model, name, trainable=False)

    def _prompts(self, live_prompts: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The held-out live prompts, topped up from the shipped prompts while live traffic is thin."""
        wanted = self.settings.gate_prompts
        return (list(live_prompts) + self._fallback_prompts)[:wanted]

    def _is_empty(self, generation: Generation) -> bool:
        return not self.tokenizer.decode(generation.response_ids, skip_special_tokens=True).strip()

    @property
    def _pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else next(iter(self.eos_token_ids))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# --- wiring: held-out data from the database, the verdict into the registry -----------------------------


def load_heldout(sessions: sessionmaker[Session], *, fraction: float, prompts: int, rated: int,
                 scan: int = 5000) -> HeldOut:
    """The newest held-out completions among the last ``scan``: up to ``prompts`` distinct prompts, and up to
    ``rated`` samples with their current rating."""
    with sessions() as session:
        recent = session.scalars(select(Completion.id).order_by(Completion.created_at.desc()).limit(scan)).all()
        held = [cid for cid in recent if is_heldout(cid, fraction, split=GATES_SPLIT)][: max(prompts, rated) * 4]
        rows = session.execute(
            select(Completion.prompt_token_ids, Completion.response_token_ids, Completion.behaviour_logprobs,
                   Completion.sampling_params, Feedback.rating)
            .outerjoin(Feedback, and_(Feedback.completion_id == Completion.id, current_rating()))
            .where(Completion.id.in_(held)).order_by(Completion.created_at.desc())
        ).all()
    distinct = list(dict.fromkeys(tuple(row.prompt_token_ids) for row in rows))[:prompts]
    samples = [LoggedSample(tuple(r.prompt_token_ids), tuple(r.response_token_ids), tuple(r.behaviour_logprobs),
                            SamplingParams.from_dict(r.sampling_params), r.rating == "up")
               for r in rows if r.rating is not None and r.response_token_ids
               and len(r.response_token_ids) == len(r.behaviour_logprobs)][:rated]
    return HeldOut(prompts=distinct, rated=samples)


def judge_candidate(registry: Registry, gates: Gates, sessions: sessionmaker[Session], name: str, *,
                    base_model_id: str) -> GateReport | None:
    """Gate a registered candidate against the live version and record the verdict (report and transition).

    A candidate whose artifact is missing or corrupt is rejected without a report; returns None then.
    """
    settings = gates.settings
    try:
        candidate = registry.artifact(name, base_model_id=base_model_id)
    except AdapterArtifactError as exc:
        registry.reject(name, actor="gate", reason=f"artifact refused: {exc}")
        return None
    live = registry.live()
    heldout = load_heldout(sessions, fraction=settings.gate_holdout_fraction, prompts=settings.gate_prompts,
                           rated=8 * settings.gate_prompts)
    report = gates.evaluate(candidate, live=None if live is None else registry.artifact(live.name),
                            heldout=heldout)
    registry.judge(name, report=report.to_dict(), failed=report.failed)
    log.info("gates %s for %s: %s", "passed" if report.passed else "failed", name, report.failed or "all pass")
    return report

"""Evaluation gates: a candidate adapter reaches users only when it passes every one of them.

A gate run costs about the same whatever the size of the held-out set. It looks at a fixed-size sample of it
(``load_heldout``: the held-out completions with the smallest split hash, so the sample changes only when a new
completion's hash beats it), generates for the sample's prompts in one batch, recomputes log-probs in batched
forwards, and caches what does not change from one run to the next: the base model's greedy responses and
reference perplexity, and the live version's log-probs of the rated sample.

1. ``reward``: the thumbs-up rate of the candidate minus the live version's, estimated off-policy from rated
   held-out completions (which neither the policy nor the reward model ever trains on). Each rate is
   self-normalised importance sampling with truncated weights, ``w_i = min(π(y_i|x_i) / b(y_i|x_i), W_MAX)``,
   ``rate = Σ w_i·up_i / Σ w_i``, where ``b`` is the behaviour probability recorded at serving time and ``π`` is
   recomputed under the same sampling parameters with ``liveloop.sampling``. Both rates reweight the same samples,
   so the difference's confidence interval (delta method, ``gate_reward_confidence``) is paired.
   - Evidence: the effective sample size ``ess`` (Kish, (Σw)²/Σw², the smaller of the candidate's and the live
     version's) must reach ``gate_reward_min_ess``. Below it the gate passes, marked "skipped: insufficient
     evidence", with null ``ci_low``/``ci_high``: the canary's thumbs then decide. Failing instead would stall
     the loop until enough held-out thumbs arrive; a verdict on a handful of samples would be noise. Log-probs
     are recomputed shortest samples first and stop once the ESS can no longer reach the minimum (``ess`` is
     then null): sequence-level weights degenerate once a candidate has moved over long responses.
   - Rule: the gate fails when ``ci_high < −gate_reward_epsilon``, i.e. the held-out thumbs show the candidate
     worse than live by more than ε. Whether they show it better is the promotion's question: it reads
     ``ci_low``, ``ci_high`` and ``ess`` from this result's details.
   - The same in ``reward_model`` mode. The candidate was optimised against the reward model, and any other
     snapshot was trained on mostly the same ratings (the next one does not even exist when the gate runs), so it
     shares the errors PPO learnt to exploit. Held-out thumbs are what every snapshot approximates, and no
     snapshot or policy trained on them. The reward model's own opinion, its mean score of the candidate's
     greedy responses minus the base's, is reported as ``reward_model_delta`` and never gated: a large value next
     to a thumbs difference near zero is what reward hacking looks like.
2. ``kl``: mean per response token of KL(π_candidate ‖ π_base), exact over the vocabulary at temperature 1, along
   the candidate's greedy responses to the gate prompts (deterministic for a given adapter, and the responses
   the sanity gates judge). That is the quantity PPO's adaptive β steers towards ``PPOConfig.target_kl`` (nats per
   token, ``LIVELOOP_PPO`` overrides included), and the bound is ``gate_kl_target_multiple`` × that target
   (``gate_max_kl`` when training has no target).
3. ``perplexity``: on ``liveloop/data/reference.txt`` ≤ (1 + δ) × the base model's.
4. Generation sanity, on the same greedy responses, each against the base model's responses to the same
   prompts: ``empty_outputs`` (prompts the candidate answers with nothing but whitespace where the base does not)
   = 0; ``repetition`` (share of repeated token trigrams) and ``length_limit_hits`` (share of responses cut at
   the token limit) within margins of the base's.
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
from functools import partial
from importlib import resources
from pathlib import Path
from statistics import NormalDist

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from sqlalchemy import and_, select
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedTokenizerBase

from liveloop.adapter_artifacts import AdapterArtifactError
from liveloop.engine.offline import Generation, generate
from liveloop.registry import Registry, current_rating
from liveloop.sampling import SamplingParams, sampling_logprobs, token_logprobs
from liveloop.settings import Settings
from liveloop.tables import Completion, Feedback
from trainer.config import PPOConfig
from trainer.heldout import GATES_SPLIT, heldout_key
from trainer.tokens import left_pad, position_ids

log = logging.getLogger(__name__)

CANDIDATE, LIVE = "gate-candidate", "gate-live"  # names of the adapters loaded for a run
DATA = resources.files("liveloop") / "data"  # the reference text and fallback prompts shipped in the package
W_MAX = 20.0  # importance-weight truncation of the reward estimate
_PPL_WINDOW = 256  # reference-text tokens per perplexity forward
_FORWARD_TOKENS = 4096  # padded tokens per batched forward (bounds activations and attention masks)
_LOGITS_CHUNK = 256  # positions whose (chunk, vocab) logits exist at once
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
    """A served, rated held-out completion: what the reward estimate reweights."""

    completion_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    sampling: SamplingParams
    thumbs_up: bool


@dataclass(frozen=True)
class HeldOut:
    prompts: list[tuple[int, ...]]  # chat-templated prompt token ids
    rated: list[LoggedSample]


@dataclass(frozen=True)
class RateDifference:
    """Thumbs-up rates of candidate and live on the same logged samples, and a CI of their difference."""

    candidate: float
    live: float
    ci_low: float
    ci_high: float
    ess: float  # the smaller of the two rates' effective sample sizes

    @property
    def difference(self) -> float:
        return self.candidate - self.live


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier one (0 for fewer than n tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def truncated_weights(log_ratio: torch.Tensor) -> torch.Tensor:
    """w = min(exp(log π − log b), W_MAX) (N,), in float64."""
    return log_ratio.double().exp().clamp(max=W_MAX)


def effective_sample_size(w: torch.Tensor) -> float:
    """Kish's (Σw)² / Σw²: how many equally weighted samples the weights are worth (0 without support)."""
    return float(w.sum() ** 2 / (w**2).sum()) if w.sum() > 0 else 0.0


def importance_weighted_rate(log_ratio: torch.Tensor, thumbs_up: torch.Tensor) -> tuple[float | None, float]:
    """Self-normalised, truncated importance-sampling estimate of a thumbs-up rate, and its effective sample size.

    log_ratio (N,): log π(y|x) − log b(y|x) per logged sample; thumbs_up (N,) in {0, 1}. None when no sample has
    support under π.
    """
    w = truncated_weights(log_ratio)  # (N,)
    if w.sum() <= 0:
        return None, 0.0
    return float((w * thumbs_up).sum() / w.sum()), effective_sample_size(w)


def rate_difference(candidate_log_ratio: torch.Tensor, live_log_ratio: torch.Tensor, thumbs_up: torch.Tensor,
                    confidence: float) -> RateDifference | None:
    """Both rates by ``importance_weighted_rate`` on the same samples, and a two-sided ``confidence`` interval of
    candidate − live by the delta method: each estimate moves by Σ_i a_i (y_i − rate) for normalised weights a, so
    the difference's variance is Σ_i e_i² with e_i = a_i (y_i − rate_c) − b_i (y_i − rate_l), paired per sample.
    None when either version gives no sample support."""
    wc, wl = truncated_weights(candidate_log_ratio), truncated_weights(live_log_ratio)  # (N,) each
    if wc.sum() <= 0 or wl.sum() <= 0:
        return None
    y = thumbs_up.double()
    a, b = wc / wc.sum(), wl / wl.sum()
    ours, theirs = float(a @ y), float(b @ y)
    e = a * (y - ours) - b * (y - theirs)  # (N,)
    n = len(y)
    se = math.sqrt(float((e**2).sum()) * n / max(n - 1, 1))
    half = NormalDist().inv_cdf((1 + confidence) / 2) * se
    diff = ours - theirs
    return RateDifference(ours, theirs, max(diff - half, -1.0), min(diff + half, 1.0),
                          min(effective_sample_size(wc), effective_sample_size(wl)))


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z) ‖ softmax(z_ref)) per row (N,) of logits (N, V), at temperature 1, exact over the vocabulary."""
    logp, logq = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def relative_delta_norm(layer: LoraLayer, adapter: str) -> float:
    """‖scaling·B A‖_F / ‖W‖_F without forming B A: ‖BA‖²_F = Σ (BᵀB) ∘ (AAᵀ), two (r, r) matrices."""
    a = layer.lora_A[adapter].weight.double()  # (r, in)
    b = layer.lora_B[adapter].weight.double()  # (out, r)
    delta = layer.scaling[adapter] * ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt()
    return float(delta / layer.get_base_layer().weight.double().norm())


def kl_bound(settings: Settings) -> tuple[float, float | None]:
    """The KL gate's bound and the training target it derives from (None: training has no target)."""
    target = PPOConfig.from_dict(settings.ppo).target_kl
    return (settings.gate_max_kl if target is None else settings.gate_kl_target_multiple * target), target


@contextmanager
def adapter_active(model: PeftModel, name: str) -> Iterator[None]:
    """Run adapter ``name`` (frozen) inside the block; the previous adapter and every ``requires_grad`` after it.

    peft has one active adapter per model, and ``set_adapter`` also flips ``requires_grad`` on every adapter's
    weights: the policy, trained in the same model, must find its adapter active and trainable as before."""
    previous = model.active_adapter
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def _gate(name: str, value: float | None, threshold: float | None, passed: bool, **details) -> GateResult:
    """A result whose numbers survive JSON (PostgreSQL refuses NaN and infinity in JSON)."""
    if value is not None and not math.isfinite(value):
        value, passed, details = None, False, {**details, "non_finite": repr(value)}
    return GateResult(name, value, threshold, passed, details)


class Gates:
    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, *, eos_token_ids: set[int],
                 settings: Settings, scorer: Scorer | None = None):
        """``scorer``: in reward_model mode, the reward model the candidates are trained against; it is only
        reported (``reward_model_delta``), never gated (module docstring)."""
        self.model, self.tokenizer, self.settings, self.scorer = model, tokenizer, settings, scorer
        self.eos_token_ids = eos_token_ids
        self.kl_bound, self.kl_target = kl_bound(settings)
        ids = tokenizer((DATA / "reference.txt").read_text())["input_ids"]
        self._reference = [torch.tensor([ids[i:i + _PPL_WINDOW]]) for i in range(0, len(ids) - 1, _PPL_WINDOW)]
        self._fallback_prompts = [
            tuple(tokenizer.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"])
            for line in (DATA / "prompts.txt").read_text().splitlines() if line.strip()
        ]
        self._base_ppl: float | None = None
        self._base_generations: dict[tuple[int, ...], Generation] = {}  # of the current prompt sample
        self._live_key: str | None = None  # the version whose log-probs _live_logprobs holds
        self._live_logprobs: dict[str, float] = {}  # completion id → log π_live(y|x), of the current rated sample

    def evaluate(self, candidate: Path, *, live: Path | None, heldout: HeldOut) -> GateReport:
        """Run every gate on the adapter in ``candidate`` against ``live`` (None: the base model is live)."""
        prompts = self._prompts(heldout.prompts)
        training = self.model.training
        try:
            with torch.no_grad(), self._loaded(candidate, CANDIDATE), self._loaded(live, LIVE):
                self.model.eval()
                live_version = (LIVE, str(live)) if live is not None else (None, "base")
                return self._run(prompts, heldout.rated, live_version)
        finally:
            self.model.train(training)

    def _run(self, prompts: list[tuple[int, ...]], rated: list[LoggedSample],
             live: tuple[str | None, str]) -> GateReport:
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
            self._reward(rated, live, candidate, base),
            self._kl(candidate),
            _gate("perplexity", perplexity, threshold, perplexity <= threshold, base=base_perplexity),
            *self._sanity(candidate, base),
            weights,
        ))

    # --- gates ----------------------------------------------------------------------------------------

    def _reward(self, rated: list[LoggedSample], live: tuple[str | None, str], candidate: list[Generation],
                base: list[Generation]) -> GateResult:
        s = self.settings
        epsilon, min_ess = s.gate_reward_epsilon, s.gate_reward_min_ess
        details = {"mode": s.reward_source, "evidence": "held-out thumbs", "samples": len(rated),
                   "confidence": s.gate_reward_confidence, "min_ess": min_ess,
                   **self._reward_model_delta(candidate, base)}
        behaviour = torch.tensor([sum(x.behaviour_logprobs) for x in rated], dtype=torch.float64)  # (N,)
        thumbs = torch.tensor([float(x.thumbs_up) for x in rated], dtype=torch.float64)  # (N,)
        self._keep_live_logprobs(live[1], rated)
        theirs = self._log_ratios(partial(self._live_sequence_logprobs, live[0]), rated, behaviour)
        ours = None if theirs is None else self._log_ratios(partial(self._sequence_logprobs, CANDIDATE), rated,
                                                            behaviour)
        estimate = None if ours is None else rate_difference(ours, theirs, thumbs, s.gate_reward_confidence)
        if estimate is None or estimate.ess < min_ess:
            ess = estimate.ess if estimate is not None else None if ours is None else 0.0  # None: stopped early
            return GateResult("reward", None, -epsilon, True, {
                **details, "ess": ess, "ci_low": None, "ci_high": None,
                "skipped": f"insufficient evidence: effective sample size below {min_ess:g}"})
        return _gate("reward", estimate.difference, -epsilon, estimate.ci_high >= -epsilon, **details,
                     candidate=estimate.candidate, live=estimate.live, ess=estimate.ess, ci_low=estimate.ci_low,
                     ci_high=estimate.ci_high)

    def _log_ratios(self, logprobs: Callable[[list[LoggedSample]], torch.Tensor], rated: list[LoggedSample],
                    behaviour: torch.Tensor) -> torch.Tensor | None:
        """log π(y|x) − log b(y|x) (N,), a forward's worth of samples at a time, shortest first; None as soon as
        the effective sample size cannot reach ``gate_reward_min_ess`` (each further sample adds at most 1 to it:
        max over the remaining weights of (S + x)² / (Q + x²/m) is S²/Q + m), which saves most of the forwards when
        the weights are degenerate, as they are once a candidate has moved over long responses."""
        min_ess = self.settings.gate_reward_min_ess
        lengths = [len(x.prompt_ids) + len(x.response_ids) for x in rated]
        order = sorted(range(len(rated)), key=lengths.__getitem__)
        if len(rated) < min_ess:
            return None
        log_ratio, done = torch.zeros(len(rated), dtype=torch.float64), []
        for rows in _token_batches(order, [lengths[i] for i in order], _FORWARD_TOKENS):
            log_ratio[rows] = logprobs([rated[i] for i in rows]) - behaviour[rows]
            done += rows
            remaining = len(rated) - len(done)
            if remaining and effective_sample_size(truncated_weights(log_ratio[done])) + remaining < min_ess:
                return None
        return log_ratio

    def _reward_model_delta(self, candidate: list[Generation], base: list[Generation]) -> dict:
        if self.scorer is None:
            return {}
        ours, theirs = (float(self.scorer([g.prompt_ids for g in gens], [g.response_ids for g in gens]).mean())
                        for gens in (candidate, base))
        return {"reward_model_delta": ours - theirs}

    def _kl(self, candidate: list[Generation]) -> GateResult:
        """Mean over response tokens of KL(π_candidate(·|prefix) ‖ π_base(·|prefix)) at T = 1, in nats."""
        prompts, responses = [g.prompt_ids for g in candidate], [g.response_ids for g in candidate]
        with self._adapter(CANDIDATE):
            ours = torch.cat(self._response_hidden(prompts, responses))  # (N, H)
        with self._adapter(None):
            theirs = torch.cat(self._response_hidden(prompts, responses))  # (N, H)
        head = self._lm_head
        kl = torch.cat([token_kl(F.linear(ours[i:i + _LOGITS_CHUNK], head), F.linear(theirs[i:i + _LOGITS_CHUNK], head))
                        for i in range(0, len(ours), _LOGITS_CHUNK)])  # (N,)
        value = float(kl.mean()) if len(kl) else 0.0
        return _gate("kl", value, self.kl_bound, value <= self.kl_bound, tokens=len(kl), positions="greedy",
                     target_kl=self.kl_target, target_multiple=self.settings.gate_kl_target_multiple)

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
        return generate(self.model, prompts, [greedy] * len(prompts),
                        eos_token_ids=self.eos_token_ids, generator=torch.Generator().manual_seed(0))

    def _base(self, prompts: list[tuple[int, ...]]) -> list[Generation]:
        """The base model's greedy responses, generated (in one batch) only for prompts new to the sample."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._base_generations]
        if missing:
            with self._adapter(None):
                self._base_generations.update(zip(missing, self._generate(missing), strict=True))
        self._base_generations = {p: self._base_generations[p] for p in prompts}
        return [self._base_generations[p] for p in prompts]

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

    def _keep_live_logprobs(self, key: str, rated: list[LoggedSample]) -> None:
        """Keep the live version's log-probs of the current rated sample, all of them if the live version changed
        (it changes only at a promotion or rollback)."""
        if key != self._live_key:
            self._live_key, self._live_logprobs = key, {}
        ids = {x.completion_id for x in rated}
        self._live_logprobs = {cid: v for cid, v in self._live_logprobs.items() if cid in ids}

    def _live_sequence_logprobs(self, adapter: str | None, samples: list[LoggedSample]) -> torch.Tensor:
        """``_sequence_logprobs`` of the live version, computed only for samples it has not seen yet."""
        missing = [x for x in samples if x.completion_id not in self._live_logprobs]
        if missing:
            recomputed = self._sequence_logprobs(adapter, missing).tolist()
            self._live_logprobs.update(zip((x.completion_id for x in missing), recomputed, strict=True))
        return torch.tensor([self._live_logprobs[x.completion_id] for x in samples], dtype=torch.float64)

    def _sequence_logprobs(self, adapter: str | None, samples: list[LoggedSample]) -> torch.Tensor:
        """log π(y|x) (N,) of each logged response under its own sampling parameters, as serving sampled it."""
        if not samples:
            return torch.zeros(0, dtype=torch.float64)
        with self._adapter(adapter):
            hidden = torch.cat(self._response_hidden([x.prompt_ids for x in samples],
                                                     [x.response_ids for x in samples]))  # (T, H), all responses
        per_token = [(x.sampling.temperature, x.sampling.top_p) for x in samples for _ in x.response_ids]
        temperature, top_p = torch.tensor(per_token).T  # (T,) each
        tokens = torch.tensor([t for x in samples for t in x.response_ids])  # (T,)
        logp = torch.cat([
            sampling_logprobs(F.linear(hidden[i:i + _LOGITS_CHUNK], self._lm_head), temperature[i:i + _LOGITS_CHUNK],
                              top_p[i:i + _LOGITS_CHUNK]).gather(1, tokens[i:i + _LOGITS_CHUNK, None]).squeeze(1)
            for i in range(0, len(tokens), _LOGITS_CHUNK)]).double()  # (T,)
        return torch.stack([part.sum() for part in logp.split([len(x.response_ids) for x in samples])])

    def _response_hidden(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                         ) -> list[torch.Tensor]:
        """Final hidden states (T_i, H) at the positions predicting each response token, under the active
        adapter: left-padded forwards of prompt + response, similar lengths together, ``_FORWARD_TOKENS`` each."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        hidden: list[torch.Tensor | None] = [None] * len(prompts)
        for rows in _token_batches(order, [len(prompts[i]) + len(responses[i]) for i in order], _FORWARD_TOKENS):
            input_ids, attention_mask = left_pad([[*prompts[i], *responses[i]] for i in rows], self._pad)  # (B, W)
            device, width = self.model.device, input_ids.shape[1]
            states = self._decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   position_ids=position_ids(attention_mask).to(device)).last_hidden_state  # (B, W, H)
            for row, i in enumerate(rows):  # every row ends in column W-1
                hidden[i] = states[row, width - 1 - len(responses[i]):width - 1].float().cpu()
        return hidden

    # --- plumbing -------------------------------------------------------------------------------------

    @property
    def _decoder(self) -> torch.nn.Module:
        """The transformer without its lm_head; LoRA layers inside it follow the active adapter."""
        return self.model.get_base_model().get_decoder()

    @property
    def _lm_head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.float().cpu()  # (V, H)

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
        return self.model.disable_adapter() if name is None else adapter_active(self.model, name)

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


def _token_batches(rows: list[int], lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive runs of ``rows`` (sorted by ascending ``lengths``) whose padded size rows × longest ≤ budget
    (a longer row goes alone)."""
    batch: list[int] = []
    for row, length in zip(rows, lengths, strict=True):
        if batch and (len(batch) + 1) * length > budget:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


# --- wiring: held-out data from the database, the verdict into the registry -----------------------------


def load_heldout(sessions: sessionmaker[Session], *, fraction: float, prompts: int, rated: int, rated_tokens: int,
                 scan: int = 5000) -> HeldOut:
    """A fixed sample of the held-out split among the newest ``scan`` completions, in the order of their split hash
    (``heldout_key``): up to ``prompts`` distinct prompts, and up to ``rated`` samples with their current rating
    and ``rated_tokens`` prompt + response tokens in all.

    Ordered by the hash, the sample is uniform over the held-out completions, and a new completion enters it
    only when its hash beats one in it, so the gates' caches keep hitting. The rated sample ends before the first
    completion that would pass the token budget: skipping that one instead would favour short responses.
    """
    with sessions() as session:
        recent = session.scalars(select(Completion.id).order_by(Completion.created_at.desc()).limit(scan)).all()
        keys = {cid: heldout_key(cid, split=GATES_SPLIT) for cid in recent}
        held = sorted((cid for cid in recent if keys[cid] < fraction), key=keys.__getitem__)
        distinct: dict[tuple[int, ...], None] = {}
        samples: list[LoggedSample] = []
        tokens, rated_full, step = 0, False, 4 * max(prompts, rated)
        for start in range(0, len(held), step):
            if len(distinct) >= prompts and rated_full:
                break
            rows = session.execute(
                select(Completion.id, Completion.prompt_token_ids, Completion.response_token_ids,
                       Completion.behaviour_logprobs, Completion.sampling_params, Feedback.rating)
                .outerjoin(Feedback, and_(Feedback.completion_id == Completion.id, current_rating()))
                .where(Completion.id.in_(held[start:start + step]))
            ).all()
            for r in sorted(rows, key=lambda r: keys[r.id]):
                if len(distinct) < prompts:
                    distinct.setdefault(tuple(r.prompt_token_ids))
                if rated_full or r.rating is None or not r.response_token_ids \
                        or len(r.response_token_ids) != len(r.behaviour_logprobs):
                    continue
                tokens += len(r.prompt_token_ids) + len(r.response_token_ids)
                rated_full = tokens > rated_tokens
                if not rated_full:
                    samples.append(LoggedSample(
                        r.id, tuple(r.prompt_token_ids), tuple(r.response_token_ids), tuple(r.behaviour_logprobs),
                        SamplingParams.from_dict(r.sampling_params), r.rating == "up"))
                    rated_full = len(samples) >= rated
    return HeldOut(prompts=list(distinct), rated=samples)


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
                           rated=settings.gate_reward_samples, rated_tokens=settings.gate_reward_tokens)
    report = gates.evaluate(candidate, live=None if live is None else registry.artifact(live.name),
                            heldout=heldout)
    registry.judge(name, report=report.to_dict(), failed=report.failed)
    log.info("gates %s for %s: %s", "passed" if report.passed else "failed", name, report.failed or "all pass")
    return report

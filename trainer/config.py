"""Every PPO hyper-parameter in one dataclass, each with what it does and why its default.

The config is saved into every adapter checkpoint (``PPOConfig.to_dict``) and checked when one is loaded
(``PPOConfig.check_resumable``): the LoRA shape must match the saved weights; other differences are allowed
(an operator may retune the learning rate) and logged. Sizes derived from it are computed here only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

from peft import LoraConfig

from liveloop.adapter_artifacts import default_lora_config

log = logging.getLogger(__name__)

# Fields that change the shape or meaning of the saved adapter weights; a checkpoint with others is unusable.
_ADAPTER_SHAPE_FIELDS = ("lora_r", "lora_alpha", "lora_layers_fraction")


@dataclass(frozen=True)
class PPOConfig:
    # --- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """Adam step size of the LoRA weights. LoRA needs about 10× a full fine-tune's rate to move as far
    (lm-human-preferences tuned GPT-2 fully at 1.41e-5); the clipped ratio and the KL term bound each update."""
    adam_eps: float = 1e-5
    """Adam epsilon; 1e-5 rather than torch's 1e-8, as in OpenAI baselines' PPO (one of the "37 details")."""
    ppo_epochs: int = 2
    """Passes over each batch: reuse of scarce live feedback, bounded by the clip. The update's cost grows with
    it, and a batch's last rating should reach a canary within minutes on a CPU."""
    num_minibatches: int = 4
    """Each epoch is split into this many shuffled minibatches, one optimiser step each."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (TRL's default); a burst of extreme advantages cannot take one huge step."""
    seed: int = 0
    """Seeds the minibatch shuffle (mixed with the policy version), so an update is reproducible."""

    # --- PPO objective ---------------------------------------------------------------------------------
    clip_eps: float = 0.2
    """Clip range ε of the ratio π_θ/π_prox (Schulman et al., 2017)."""
    ent_coef: float = 0.0
    """Entropy bonus. 0 as in InstructGPT and TRL: the KL term to the reference already keeps the policy from
    collapsing. Entropy is always measured and reported."""
    baseline_window: int = 256
    """Ratings the running baseline and scale of the scores average over (``RunningMoments``): a thumb is
    judged against the recent mean, so a thumbs-up is worth more when thumbs-up are rare."""

    # --- KL to the reference (the base model, adapter off) ---------------------------------------------
    init_kl_coef: float = 0.1
    """Initial β of the loss term β·KL(π_θ‖π_ref), the exact KL over the vocabulary at each response position."""
    target_kl: float | None = 0.05
    """Adaptive KL: the mean per-token KL(π‖π_ref) in nats, at temperature 1, that β is steered towards; None:
    fixed β. The gates measure the same quantity on the candidate's own responses (``gate_kl_target_multiple``).
    0.05 nats over a 48-token answer is 2.4 nats per answer, several times the least KL a 25-point rise of a
    liked share needs (a tilt from 0.15 to 0.4 costs 0.14 nats), so the target leaves room to learn."""
    min_kl_coef: float = 0.01
    """Adaptive KL: β never falls below this. While a young policy is far under its target β would otherwise
    shrink 20 % per update towards 0, and then need dozens of updates to climb back once the KL overshoots."""
    kl_adapt_rate: float = 0.2
    """Adaptive KL: each update multiplies β by (1 + clip(KL/target − 1, ±1) · rate); with 0.2, β can move
    20 % per update, so it follows the policy within a few updates (Ziegler et al.'s horizon of 10,000
    sequences moved it 0.13 % per update at live batch sizes: not at all)."""

    # --- off-policy correction -------------------------------------------------------------------------
    temperature: float = 1.0
    """Training-side temperature for samples recorded greedily (T = 0), whose behaviour distribution is a point
    mass and says nothing about a temperature. Sampled responses use the temperature they were sampled at."""
    is_weight_cap: float = 2.0
    """Truncated importance sampling: each token's weight π_prox/μ is capped here (verl's rollout correction,
    default 2). A sample served by an older version is corrected, never dropped: its tokens that the current
    policy has made unlikely simply weigh little."""

    # --- model and speed -------------------------------------------------------------------------------
    lora_r: int = 16
    """LoRA rank on the policy adapter (the serving benchmark's r16)."""
    lora_alpha: int = 32
    """LoRA scale numerator: the update is scaled by alpha/r = 2, the common choice."""
    lora_layers_fraction: float = 0.5
    """LoRA goes on the top ⌈f·L⌉ decoder layers only. The frozen lower layers then run once per batch, under
    no-grad, and their output is reused by the reference pass, the proximal pass and every epoch; the backward
    stops at the first adapted layer. bench/ppo.py on SmolLM2 against a naive update (shared 2-core machine):
    half 1.8–2.0× the speed at 0.49× the peak RSS, a quarter 2.5–3.4× at 0.38×, all layers 1.5–1.7× at 0.76×."""
    logits_chunk: int = 256
    """Response positions whose (chunk, vocab) logits exist at once; bounds the lm_head's transient memory."""
    bf16_autocast: bool | None = None
    """bf16 autocast for the transformer in the update and the fresh rollouts; None: on where bf16 matmuls are
    native (``liveloop.model.native_bf16``: AVX512-BF16 or AMX, a CUDA device that supports it). On an AVX512-BF16
    EPYC at one thread it made an update of 64 rollouts 1.8× faster and their generation 1.9× (README); without
    those units the matmuls are emulated, measured 5× slower than fp32 on this project's AVX2 machines."""

    def __post_init__(self) -> None:
        checks = {
            "learning_rate > 0": self.learning_rate > 0,
            "ppo_epochs >= 1": self.ppo_epochs >= 1,
            "num_minibatches >= 1": self.num_minibatches >= 1,
            "0 < clip_eps < 1": 0 < self.clip_eps < 1,
            "baseline_window >= 1": self.baseline_window >= 1,
            "init_kl_coef >= 0": self.init_kl_coef >= 0,
            "target_kl is None or > 0": self.target_kl is None or self.target_kl > 0,
            "temperature > 0": self.temperature > 0,
            "is_weight_cap >= 1": self.is_weight_cap >= 1,
            "kl_adapt_rate >= 0": self.kl_adapt_rate >= 0,
            "0 <= min_kl_coef <= init_kl_coef": 0 <= self.min_kl_coef <= self.init_kl_coef,
            "0 < lora_layers_fraction <= 1": 0 < self.lora_layers_fraction <= 1,
            "logits_chunk >= 1": self.logits_chunk >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid PPOConfig: {', '.join(failed)}")

    # --- derived sizes, computed here only -------------------------------------------------------------
    def minibatch_size(self, batch_size: int) -> int:
        """Sequences per minibatch; the last minibatch of an epoch may be smaller."""
        return math.ceil(batch_size / self.num_minibatches)

    def lora_layers(self, num_hidden_layers: int) -> list[int]:
        """Indices of the decoder layers that carry the policy adapter: the top ⌈f·L⌉."""
        count = math.ceil(self.lora_layers_fraction * num_hidden_layers)
        return list(range(num_hidden_layers - count, num_hidden_layers))

    def lora_config(self, num_hidden_layers: int) -> LoraConfig:
        # dropout 0: the proximal log-probs must be reproducible, so the first ratio is exactly 1
        return default_lora_config(r=self.lora_r, alpha=self.lora_alpha,
                                   layers_to_transform=self.lora_layers(num_hidden_layers))

    # --- checkpoint metadata ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PPOConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PPOConfig fields {sorted(unknown)}")
        return cls(**data)

    def check_resumable(self, saved: dict) -> None:
        """Refuse a checkpoint whose adapter shape differs from this config; log other differences."""
        known = {f.name for f in fields(PPOConfig)}
        if set(saved) - known:  # a checkpoint of an older recipe: its weights still load, its knobs are gone
            log.info("checkpoint hyper-parameters no longer in PPOConfig: %s", sorted(set(saved) - known))
        saved_config = PPOConfig.from_dict({k: v for k, v in saved.items() if k in known})
        shape = [f for f in _ADAPTER_SHAPE_FIELDS if getattr(saved_config, f) != getattr(self, f)]
        if shape:
            raise ValueError("checkpoint adapter differs from this PPOConfig in " + ", ".join(
                f"{f} (saved {getattr(saved_config, f)}, configured {getattr(self, f)})" for f in shape))
        changed = {f.name: (getattr(saved_config, f.name), getattr(self, f.name)) for f in fields(self)
                   if getattr(saved_config, f.name) != getattr(self, f.name)}
        if changed:
            log.info("resuming with changed hyper-parameters (saved → now): %s", changed)

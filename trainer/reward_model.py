"""A reward model learned from live thumbs: a second LoRA adapter on the policy's base plus a scalar head.

Successful reward models have capacity similar to the generator, so the reward model is the policy's own base
model with its own LoRA adapter (``"reward"``) on the same ``PeftModel``: no second copy of the base in memory.
The score is a linear head on the final hidden state of the last token of prompt + response.

Training (Ziegler et al. 2019; Ouyang et al. 2022, with single ratings instead of rankings):
- pointwise: every rated response, logistic loss of the score against the thumb (up = 1, down = 0);
- pairwise: where one prompt has both an up- and a down-rated response, Bradley–Terry −log σ(r_up − r_down).
Labelled examples are kept in a bounded buffer keyed by completion id, holding each completion's latest rating by
revision (a change of mind replaces the earlier rating whatever order the events arrive in). Each increment trains
a few epochs from the current weights on a bounded set: the ratings new since the last increment, topped up with
a random replay sample of older ones, so its cost does not grow with the buffer. A stable hash of the completion
id puts a fixed fraction of examples in a held-out split that is never trained on.

What PPO gets is ``reward``: the score normalised to mean 0 and standard deviation 1 over the scores of the last
increment's training examples (lm-human-preferences normalises on samples, too), so a learning rate means the
same whatever scale the head drifts to. PPO uses the reward model only while it is ``usable``: its held-out
balanced accuracy is above chance with confidence (a one-sided normal bound, ``usable_z``). A reward model at
chance would only teach the policy noise.

Adapter switching: peft has one active adapter per model, and ``set_adapter`` also flips ``requires_grad`` on
every adapter's weights. ``adapter_active`` switches to the reward adapter for the duration of a ``with`` block
and afterwards restores the previously active adapter and every parameter's ``requires_grad`` exactly, even
when the block raises. The policy therefore never sees a change: after scoring or training the reward model,
the policy adapter is active and trainable as before. It is not thread-safe: nothing else may run the model
while the block runs (the trainer is one thread; serving has its own model).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from liveloop.adapter_artifacts import EXTRA_TENSORS, default_lora_config, save_adapter, verify_adapter
from trainer.heldout import REWARD_MODEL_SPLIT, is_heldout
from trainer.tokens import left_pad, position_ids

if TYPE_CHECKING:
    from feedback.events import FeedbackEvent

log = logging.getLogger(__name__)

REWARD_ADAPTER = "reward"
_HEAD_PREFIX = "score_head."


@dataclass(frozen=True)
class RewardModelConfig:
    """Hyper-parameters of the reward model; saved with every reward-model version."""

    lr: float = 5e-4  # AdamW step size for the reward LoRA and head. Higher than a LoRA fine-tune's usual 1e-4: an
    # increment takes few steps (≤ 256 examples × 2 epochs), and the toy test's reward model was still at chance
    # after 2,048 thumbs at 1e-4 (usable after ~1,300 at 5e-4)
    weight_decay: float = 0.0  # AdamW decoupled weight decay; LoRA is small enough not to need it
    epochs_per_increment: int = 2  # passes over the buffer per increment: few, as each starts from trained weights
    batch_size: int = 16  # examples per optimizer step (and per scoring forward)
    max_grad_norm: float = 1.0  # gradient-norm clip; one mislabelled outlier must not blow up the head
    heldout_fraction: float = 0.1  # share of completion ids never trained on, for held-out balanced accuracy
    pointwise_weight: float = 1.0  # weight of the logistic loss on single ratings (always available)
    pairwise_weight: float = 1.0  # weight of Bradley–Terry on up/down pairs of one prompt (rarer, more informative)
    max_examples: int = 4096  # bound of the labelled-example buffer; the oldest ratings are dropped first
    max_examples_per_increment: int = 256  # the new ratings, then a random replay sample of older ones, up to this:
    # an increment's cost is bounded whatever the buffer's size (full passes over 4,096 took 8 minutes on a CPU)
    usable_z: float = 2.33  # PPO trusts the model when balanced accuracy − z·SE > 0.5 (one-sided 99 %)
    usable_min_per_thumb: int = 8  # ... and the held-out split holds at least this many of each thumb
    lora_r: int = 16  # rank of the reward LoRA, as the policy's: similar capacity to the generator
    lora_alpha: int = 32  # LoRA scaling numerator (alpha / r = 2, the LoRA paper's setting)
    seed: int = 0  # head initialisation and minibatch shuffling


@dataclass(frozen=True)
class RatedResponse:
    """One response with its latest thumb, as the feedback stream delivers it."""

    completion_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    thumbs_up: bool
    revision: int = 1  # the rating's revision: a later one replaces an earlier one, never the reverse

    @classmethod
    def from_event(cls, event: FeedbackEvent) -> RatedResponse:
        return cls(event.completion_id, tuple(event.prompt_token_ids), tuple(event.response_token_ids),
                   event.rating == "up", event.revision)


@dataclass(frozen=True)
class RewardModelMetrics:
    """What one increment did; the worker exports these under the same names."""

    increment: int  # increments trained so far, this one included
    loss: float | None  # mean combined loss over the increment's last epoch; None when nothing was trained
    pointwise_loss: float | None
    pairwise_loss: float | None  # None also when the training split holds no up/down pair
    # mean of the held-out accuracy on thumbs up and on thumbs down (a constant score gets 0.5 however unbalanced
    # the thumbs); None unless the held-out split holds both an up and a down rating
    heldout_balanced_accuracy: float | None
    heldout_balanced_accuracy_low: float | None  # its one-sided lower bound at usable_z; None with heldout None
    usable: bool  # PPO may use the model: the lower bound is above 0.5 on enough held-out thumbs
    n_examples: int  # labelled examples in the buffer
    n_train: int
    n_heldout: int
    n_pairs: int  # up/down pairs of one prompt in the training split


def pointwise_loss(scores: torch.Tensor, thumbs_up: torch.Tensor) -> torch.Tensor:
    """Logistic loss of scores (B,) against thumbs (B,) in {0, 1}: the score is the log-odds of a thumb up."""
    return F.binary_cross_entropy_with_logits(scores, thumbs_up.to(scores.dtype))


def pairwise_loss(scores_up: torch.Tensor, scores_down: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: mean over pairs (P,) of −log σ(r_up − r_down)."""
    return -F.logsigmoid(scores_up - scores_down).mean()


def preference_pairs(examples: Sequence[RatedResponse]) -> tuple[list[int], list[int]]:
    """Indices (up, down) of every up/down pair of responses to the same prompt within ``examples``."""
    by_prompt: dict[tuple[int, ...], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, example in enumerate(examples):
        by_prompt[example.prompt_ids][0 if example.thumbs_up else 1].append(i)
    pairs = [(u, d) for ups, downs in by_prompt.values() for u in ups for d in downs]
    return [u for u, _ in pairs], [d for _, d in pairs]


def balanced_accuracy(scores: torch.Tensor, thumbs_up: torch.Tensor) -> float | None:
    """Mean over the two thumbs of the share of ratings (B,) whose thumb the sign of the score (B,) predicts.

    Plain accuracy rewards the majority thumb: with 77% of ratings down, a model that always says "down" scores
    0.77. Balanced accuracy gives any constant score 0.5 and a perfect one 1.0, whatever the balance. With only
    one thumb present it is undefined, and None: that one thumb's accuracy would call such a constant perfect.
    """
    predicted_up = scores > 0  # the score is the log-odds of a thumb up
    up, down = thumbs_up.bool(), ~thumbs_up.bool()
    if not up.any() or not down.any():
        return None
    recall_up = predicted_up[up].float().mean()
    recall_down = (~predicted_up[down]).float().mean()
    return ((recall_up + recall_down) / 2).item()


def balanced_accuracy_low(scores: torch.Tensor, thumbs_up: torch.Tensor, z: float) -> float | None:
    """One-sided lower bound of ``balanced_accuracy``: its value − z·SE, SE = ½·√(Σ_thumb a(1−a)/n) over the two
    recalls (normal approximation; a recall of 0 or 1 is taken as 1/(2n) from the edge, so a perfect score on
    few ratings is not certain)."""
    value = balanced_accuracy(scores, thumbs_up)
    if value is None:
        return None
    predicted_up, up = scores > 0, thumbs_up.bool()
    variance = 0.0
    for rows, correct in ((up, predicted_up), (~up, ~predicted_up)):
        n = int(rows.sum())
        recall = min(max(float(correct[rows].float().mean()), 1 / (2 * n)), 1 - 1 / (2 * n))
        variance += recall * (1 - recall) / n
    return value - z * 0.5 * math.sqrt(variance)


@contextmanager
def adapter_active(model: PeftModel, name: str, *, trainable: bool) -> Iterator[None]:
    """Make adapter ``name`` the active one inside the block; restore the adapter and requires_grad after."""
    previous = model.active_adapter
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    model.set_adapter(name, inference_mode=not trainable)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


class RewardModel:
    """The reward adapter and scalar head on a shared ``PeftModel``, its example buffer and its optimizer."""

    def __init__(self, model: PeftModel, head: nn.Linear, *, config: RewardModelConfig, base_model_id: str,
                 pad_token_id: int, increments: int = 0, normalizer: tuple[float, float] = (0.0, 1.0)) -> None:
        self.model, self.head, self.config = model, head, config
        self.base_model_id, self.pad_token_id = base_model_id, pad_token_id
        self.increments = increments
        self.normalizer = normalizer  # (mean, std) of the scores of the last increment's training examples
        self.examples: OrderedDict[str, RatedResponse] = OrderedDict()  # completion id → latest rating
        self._new: set[str] = set()  # completion ids rated (or re-rated) since the last increment
        self.last_metrics: RewardModelMetrics | None = None
        adapter_params = [p for n, p in model.named_parameters() if "lora_" in n and f".{REWARD_ADAPTER}." in n]
        assert adapter_params, f"the model has no {REWARD_ADAPTER!r} adapter"
        # Adam state persists across increments: each increment continues the same optimisation
        self.optimizer = torch.optim.AdamW([*adapter_params, *head.parameters()], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self._generator = torch.Generator().manual_seed(config.seed)

    @classmethod
    def create(cls, model: PeftModel, *, base_model_id: str, pad_token_id: int,
               config: RewardModelConfig | None = None) -> RewardModel:
        """Add a fresh reward adapter (LoRA B = 0, so it starts as the base) and a new head to ``model``."""
        config = config or RewardModelConfig()
        model.add_adapter(REWARD_ADAPTER, default_lora_config(r=config.lora_r, alpha=config.lora_alpha))
        hidden = model.get_base_model().config.hidden_size
        head = nn.Linear(hidden, 1, device=model.device)
        # std 1/sqrt(d+1) as in Ziegler et al.'s lm-human-preferences: initial scores of order one
        nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1),
                        generator=torch.Generator(model.device).manual_seed(config.seed))
        nn.init.zeros_(head.bias)
        return cls(model, head, config=config, base_model_id=base_model_id, pad_token_id=pad_token_id)

    @classmethod
    def load(cls, model: PeftModel, path: Path, *, base_model_id: str, pad_token_id: int, sha256: str | None = None,
             config: RewardModelConfig | None = None) -> RewardModel:
        """Load a saved version into ``model`` (replacing the weights of an existing reward adapter).

        ``config`` retunes training from here on (None: the saved one); its LoRA shape must be the saved one.
        The example buffer and Adam state are not saved: ratings refill the buffer as they arrive.
        """
        manifest = verify_adapter(path, base_model_id=base_model_id, sha256=sha256)
        info = manifest["metadata"]
        known = {f.name for f in fields(RewardModelConfig)}
        saved = RewardModelConfig(**{k: v for k, v in info["config"].items() if k in known})
        config = config or saved
        if (config.lora_r, config.lora_alpha) != (saved.lora_r, saved.lora_alpha):
            raise ValueError(f"{path}: saved with LoRA r={saved.lora_r}, alpha={saved.lora_alpha}; "
                             f"configured r={config.lora_r}, alpha={config.lora_alpha}")
        # is_trainable=True keeps peft from switching the whole model to eval mode; freeze it again below
        model.load_adapter(path, adapter_name=REWARD_ADAPTER, is_trainable=True)
        model.set_requires_grad(REWARD_ADAPTER, requires_grad=False)
        tensors = load_file(path / EXTRA_TENSORS, device=str(model.device))
        state = {k.removeprefix(_HEAD_PREFIX): v for k, v in tensors.items() if k.startswith(_HEAD_PREFIX)}
        head = nn.Linear(state["weight"].shape[1], 1, device=model.device)
        head.load_state_dict(state)
        return cls(model, head, config=config, base_model_id=base_model_id, pad_token_id=pad_token_id,
                   increments=info["increments"], normalizer=tuple(info.get("normalizer", (0.0, 1.0))))

    def add(self, examples: Iterable[RatedResponse]) -> None:
        """Buffer ratings: per completion the highest revision stays (an older one arriving late is ignored);
        the oldest completions drop out past ``max_examples``."""
        for example in examples:
            held = self.examples.get(example.completion_id)
            if held is not None and held.revision >= example.revision:
                continue
            self.examples.pop(example.completion_id, None)
            self.examples[example.completion_id] = example
            self._new.add(example.completion_id)
        while len(self.examples) > self.config.max_examples:
            self._new.discard(self.examples.popitem(last=False)[0])

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scores (B,) float32 (the log-odds of a thumb up) of each prompt + response, in chunks of
        ``batch_size``; the policy stays active."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        if not prompt_ids:
            return torch.zeros(0)
        step = self.config.batch_size
        with adapter_active(self.model, REWARD_ADAPTER, trainable=False):
            chunks = [self._forward(prompt_ids[i:i + step], response_ids[i:i + step])
                      for i in range(0, len(prompt_ids), step)]
        return torch.cat(chunks).cpu()

    def reward(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The normalised score (B,) that PPO optimises: (score − mean) / std of the last increment's scores."""
        mean, std = self.normalizer
        return (self.score(prompt_ids, response_ids) - mean) / std

    @property
    def usable(self) -> bool:
        """Whether PPO may use this model: the last increment found it above chance with confidence."""
        return self.last_metrics is not None and self.last_metrics.usable

    def _forward(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores (B,) through the trunk only (no LM head): the hidden state of each sequence's last token."""
        sequences = [[*p, *r] for p, r in zip(prompt_ids, response_ids, strict=True)]
        input_ids, attention_mask = left_pad(sequences, self.pad_token_id)  # (B, T), last token in column T-1
        device = self.model.device
        trunk = self.model.get_base_model().get_decoder()
        hidden = trunk(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids(attention_mask).to(device), use_cache=False).last_hidden_state
        return self.head(hidden[:, -1].float()).squeeze(-1)  # (B, H) → (B,)

    def train_increment(self) -> RewardModelMetrics:
        """A few epochs over the new ratings plus a replay sample, from the current weights; then the normaliser
        and the held-out balanced accuracy."""
        train = self._increment_examples()
        epoch_stats: list[tuple[float, float, float | None]] = []
        scores: list[torch.Tensor] = []
        with adapter_active(self.model, REWARD_ADAPTER, trainable=True):
            for _ in range(self.config.epochs_per_increment):
                scores = []
                epoch_stats = [stats for batch in self._minibatches(train) if (stats := self._step(batch, scores))]
        if scores:  # the last epoch's scores, each taken just before its step: the scale PPO will see
            every = torch.cat(scores)
            self.normalizer = (float(every.mean()), float(every.std()) if len(every) > 1 and every.std() > 1e-6
                               else 1.0)
        self._new.clear()
        self.increments += 1
        n_train = sum(not self._heldout(e) for e in self.examples.values())
        accuracy, low = self._heldout_accuracy()
        config = self.config
        pair_losses = [pair for _, _, pair in epoch_stats if pair is not None]
        self.last_metrics = RewardModelMetrics(
            increment=self.increments,
            loss=_mean([loss for loss, _, _ in epoch_stats]),
            pointwise_loss=_mean([point for _, point, _ in epoch_stats]),
            pairwise_loss=_mean(pair_losses),
            heldout_balanced_accuracy=accuracy, heldout_balanced_accuracy_low=low,
            usable=low is not None and low > 0.5 and self._heldout_thumbs() >= config.usable_min_per_thumb,
            n_examples=len(self.examples), n_train=n_train, n_heldout=len(self.examples) - n_train,
            n_pairs=len(preference_pairs(train)[0]),
        )
        log.info("reward model increment %d: %s", self.increments, asdict(self.last_metrics))
        return self.last_metrics

    def _increment_examples(self) -> list[RatedResponse]:
        """The training split's new ratings (the newest if more are new than fit), then a random sample of the
        older ones, ``max_examples_per_increment`` in all."""
        room = self.config.max_examples_per_increment
        train = [e for e in self.examples.values() if not self._heldout(e)]
        new = [e for e in train if e.completion_id in self._new][-room:]
        old = [e for e in train if e.completion_id not in self._new]
        picks = torch.randperm(len(old), generator=self._generator)[:room - len(new)].tolist()
        return new + [old[i] for i in picks]

    def _minibatches(self, examples: Sequence[RatedResponse]) -> Iterator[list[RatedResponse]]:
        """Shuffled minibatches that keep the responses to one prompt together, so their pairs meet."""
        by_prompt: dict[tuple[int, ...], list[RatedResponse]] = defaultdict(list)
        for example in examples:
            by_prompt[example.prompt_ids].append(example)
        groups = list(by_prompt.values())
        size, batch = self.config.batch_size, []
        for i in torch.randperm(len(groups), generator=self._generator).tolist():
            for start in range(0, len(groups[i]), size):  # a group larger than a batch is cut into batches
                piece = groups[i][start:start + size]
                if batch and len(batch) + len(piece) > size:
                    yield batch
                    batch = []
                batch.extend(piece)
        if batch:
            yield batch

    def _step(self, batch: list[RatedResponse], scores_seen: list[torch.Tensor]
              ) -> tuple[float, float, float | None] | None:
        """One optimizer step; returns (loss, pointwise, pairwise) or None when the loss was not finite."""
        scores = self._forward([e.prompt_ids for e in batch], [e.response_ids for e in batch])  # (B,)
        scores_seen.append(scores.detach().cpu())
        point = pointwise_loss(scores, torch.tensor([e.thumbs_up for e in batch], device=scores.device))
        up, down = preference_pairs(batch)
        pair = pairwise_loss(scores[up], scores[down]) if up else None
        loss = self.config.pointwise_weight * point + (self.config.pairwise_weight * pair if up else 0.0)
        if not torch.isfinite(loss):
            log.warning("reward model: non-finite loss on a batch of %d, step skipped", len(batch))
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                 self.config.max_grad_norm)
        self.optimizer.step()
        return loss.item(), point.item(), pair.item() if up else None

    def _heldout(self, example: RatedResponse) -> bool:
        return is_heldout(example.completion_id, self.config.heldout_fraction, split=REWARD_MODEL_SPLIT)

    def _heldout_thumbs(self) -> int:
        """The fewer of the held-out split's thumbs up and thumbs down."""
        thumbs = [e.thumbs_up for e in self.examples.values() if self._heldout(e)]
        return min(sum(thumbs), len(thumbs) - sum(thumbs))

    def _heldout_accuracy(self) -> tuple[float | None, float | None]:
        """``balanced_accuracy`` of the held-out ratings' scores and its lower bound; None unless both thumbs
        are among them."""
        heldout = [e for e in self.examples.values() if self._heldout(e)]
        if len({e.thumbs_up for e in heldout}) < 2:
            return None, None
        scores = self.score([e.prompt_ids for e in heldout], [e.response_ids for e in heldout])
        thumbs = torch.tensor([e.thumbs_up for e in heldout])
        return balanced_accuracy(scores, thumbs), balanced_accuracy_low(scores, thumbs, self.config.usable_z)

    def save(self, dest: Path, *, metadata: dict | None = None) -> str:
        """Write this version (adapter, head, config, normaliser, last metrics) atomically to ``dest``; return its
        sha256."""
        info = {
            "kind": "reward_model",
            "config": asdict(self.config),
            "increments": self.increments,
            "normalizer": list(self.normalizer),
            "n_examples": len(self.examples),
            "metrics": asdict(self.last_metrics) if self.last_metrics else None,
            **(metadata or {}),
        }
        head = {_HEAD_PREFIX + k: v.detach() for k, v in self.head.state_dict().items()}
        return save_adapter(self.model, REWARD_ADAPTER, dest, base_model_id=self.base_model_id, metadata=info,
                            extra_tensors=head)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None

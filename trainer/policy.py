"""The policy: one base model and a LoRA policy adapter, with what an update keeps between batches.

One forward of a Llama-family decoder, split where the adapter starts (``PPOConfig.lora_layers``):

    tokens → embeddings → layers[:split] (frozen) → layers[split:] (LoRA "policy") → norm → lm_head

Everything below ``split`` is the same for the policy and the reference and does not change during an update, so
``encode`` runs it once per batch under no-grad, and every later pass starts from its output: the reference
pass (the same weights with the adapter disabled: no second copy of the model), the proximal pass, and each
epoch's minibatches. The backward stops at ``split`` by itself, as nothing below it requires grad.

Sequences are right-padded (prompt, response, padding) with positions 0..L-1: padding comes after every real
token, so the plain causal mask is the whole mask (sdpa's ``is_causal`` path). Only the hidden states that
predict a response token reach the heads, and their log-probs come from ``trainer.lm_head`` in chunks.

Checkpoints: the adapter through ``liveloop.adapter_artifacts.save_adapter``; the PPOConfig, version, β and the running
moments of the scores in its metadata under ``"ppo"``. ``load`` checks them against this process.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from liveloop.adapter_artifacts import save_adapter, verify_adapter
from liveloop.model import native_bf16
from trainer.config import PPOConfig
from trainer.lm_head import chosen_logprobs
from trainer.ppo import AdaptiveKLController, RunningMoments

log = logging.getLogger(__name__)

POLICY_ADAPTER = "policy"


@dataclass
class PaddedBatch:
    """Samples as right-padded tensors: one row of prompt + response (+ padding) per sample."""

    input_ids: torch.Tensor  # (B, L)
    lengths: torch.Tensor  # (B,) real tokens, prompt + response
    positions: torch.Tensor  # (B, T) the position whose hidden state predicts response token t
    response_ids: torch.Tensor  # (B, T), 0 on padding
    mask: torch.Tensor  # (B, T) float, 1.0 on response tokens
    temperature: torch.Tensor  # (B,) the temperature each row's log-probs are taken at

    @classmethod
    def from_tokens(cls, prompts: list[list[int]], responses: list[list[int]], temperature: list[float],
                    pad_token_id: int) -> PaddedBatch:
        rows = [torch.tensor([*p, *r]) for p, r in zip(prompts, responses, strict=True)]
        response_rows = [torch.tensor(r) for r in responses]
        prompt_len = torch.tensor([len(p) for p in prompts])  # (B,)
        response_ids = pad_sequence(response_rows, batch_first=True)  # (B, T)
        steps = torch.arange(response_ids.shape[1])  # (T,)
        mask = (steps[None] < torch.tensor([len(r) for r in responses])[:, None]).float()
        return cls(
            input_ids=pad_sequence(rows, batch_first=True, padding_value=pad_token_id),
            lengths=torch.tensor([len(row) for row in rows]),
            positions=(prompt_len[:, None] - 1 + steps[None]) * mask.long(),  # padding points at position 0
            response_ids=response_ids, mask=mask, temperature=torch.tensor(temperature, dtype=torch.float32),
        )

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(*(t.to(device) for t in (self.input_ids, self.lengths, self.positions,
                                                      self.response_ids, self.mask, self.temperature)))

    def rows(self, index: torch.Tensor) -> PaddedBatch:
        """The rows ``index``, trimmed to their longest sequence."""
        width = int(self.lengths[index].max())
        return PaddedBatch(self.input_ids[index, :width], self.lengths[index], self.positions[index],
                           self.response_ids[index], self.mask[index], self.temperature[index])


@dataclass
class TokenOutputs:
    """Per response position of a batch (b, T); padding positions hold 0."""

    logprobs: torch.Tensor  # log π(a_t | s_t) at the row's temperature
    entropy: torch.Tensor | None  # entropy of π(· | s_t) at the row's temperature; training passes only
    kl: torch.Tensor | None  # KL(π(· | s_t) ‖ π_ref(· | s_t)) at temperature 1, when reference states were given


class Policy:
    """A peft model with the ``"policy"`` adapter, the optimizer, the version, β and the score moments.

    Everything a PPO update reads or changes lives here, and ``save``/``load`` keep it together. The peft model
    may carry other adapters (the reward model's); they must be inactive whenever this class runs it.
    """

    def __init__(self, model: PeftModel, config: PPOConfig, *, base_model_id: str, version: int = 0,
                 kl_coef: float | None = None, moments: RunningMoments | None = None) -> None:
        self.model, self.config = model, config
        self.base_model_id, self.version = base_model_id, version
        self.kl_ctl = AdaptiveKLController.from_config(config, kl_coef)
        self.moments = moments or RunningMoments(config.baseline_window)
        self.moments.window = config.baseline_window  # a retuned window applies from now on
        self.causal_lm = model.get_base_model()
        self.decoder = self.causal_lm.get_decoder()
        self.split = config.lora_layers(len(self.decoder.layers))[0]
        self._trainable = [p for n, p in model.named_parameters() if f".{POLICY_ADAPTER}." in n and "lora_" in n]
        self.optimizer = torch.optim.AdamW(self._trainable, lr=config.learning_rate,
                                           eps=config.adam_eps, weight_decay=0.0)

    @classmethod
    def create(cls, base: PreTrainedModel, config: PPOConfig, *, base_model_id: str) -> Policy:
        """Wrap the one base model with a fresh policy adapter (LoRA B = 0: it starts as the reference)."""
        model = get_peft_model(base, config.lora_config(base.config.num_hidden_layers), adapter_name=POLICY_ADAPTER)
        return cls(model.eval(), config, base_model_id=base_model_id)

    @classmethod
    def load(cls, base: PreTrainedModel, path: Path, config: PPOConfig, *, base_model_id: str,
             sha256: str | None = None) -> Policy:
        """Resume from a saved version: verify the files, the base id and the config, then load."""
        manifest = verify_adapter(path, base_model_id=base_model_id, sha256=sha256)
        ppo = manifest["metadata"].get("ppo")
        if ppo is None:
            raise ValueError(f"{path} is not a policy checkpoint (no 'ppo' metadata)")
        config.check_resumable(ppo["config"])
        model = PeftModel.from_pretrained(base, path, adapter_name=POLICY_ADAPTER, is_trainable=True)
        moments = RunningMoments(config.baseline_window, **ppo["moments"]) if "moments" in ppo else None
        return cls(model.eval(), config, base_model_id=base_model_id, version=ppo["version"],
                   kl_coef=ppo["kl_coef"], moments=moments)

    def save(self, dest: Path, *, metadata: dict | None = None) -> str:
        """Write the adapter and the PPO state atomically to ``dest`` (never overwritten); return sha256."""
        moments = {"count": self.moments.count, "mean": self.moments.mean, "var": self.moments.var}
        ppo = {"config": self.config.to_dict(), "version": self.version, "kl_coef": self.kl_ctl.value,
               "moments": moments}
        return save_adapter(self.model, POLICY_ADAPTER, dest, base_model_id=self.base_model_id,
                            metadata={**(metadata or {}), "ppo": ppo})

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy adapter's LoRA weights: all that PPO changes."""
        return self._trainable

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings and the frozen layers below the adapter: (B, L) → hidden (B, L, H), once per batch."""
        with self.autocast():
            hidden = self.decoder.embed_tokens(input_ids.to(self.causal_lm.device))
            return self._layers(hidden, self.decoder.layers[:self.split])

    def states(self, lower: torch.Tensor, batch: PaddedBatch, *, reference: bool = False) -> torch.Tensor:
        """The adapted layers from ``encode``'s output, normed, at the response positions: (b, T, H), 0 on padding.

        ``reference``: adapter disabled, no grad. Otherwise differentiable when grad is enabled.
        """
        assert self.model.active_adapter == POLICY_ADAPTER, "another adapter is active on the shared model"
        adapter_off = self.model.disable_adapter() if reference else nullcontext()
        with adapter_off, torch.set_grad_enabled(torch.is_grad_enabled() and not reference), self.autocast():
            hidden = self._layers(lower[:, :batch.input_ids.shape[1]], self.decoder.layers[self.split:])
            picked = hidden.gather(1, batch.positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (b, T, H)
            return self.decoder.norm(picked) * batch.mask[..., None]

    def token_outputs(self, states: torch.Tensor, batch: PaddedBatch,
                      ref_states: torch.Tensor | None = None) -> TokenOutputs:
        """Log-probs (and, with grad, entropies; with ``ref_states``, KLs to the reference) from ``states``."""
        real = batch.mask.bool()
        temperature = batch.temperature[:, None].expand_as(batch.mask)[real]  # (N,)
        logprobs, entropy, kl = chosen_logprobs(
            states[real], self.causal_lm.get_output_embeddings().weight, batch.response_ids[real], temperature,
            self.config.logits_chunk, entropy_grad=self.config.ent_coef != 0,
            ref_hidden=None if ref_states is None else ref_states[real])
        return TokenOutputs(_scatter(logprobs, real), _scatter(entropy, real), _scatter(kl, real))

    def _layers(self, hidden: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
        """Run decoder ``layers`` over right-padded hidden states (B, L, H), as the model's own forward does."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, L)
        mask = create_causal_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=position_ids)
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return hidden

    def autocast(self) -> torch.autocast:
        """The update's and the rollouts' precision (``PPOConfig.bf16_autocast``)."""
        device = self.causal_lm.device
        enabled = native_bf16(device) if self.config.bf16_autocast is None else self.config.bf16_autocast
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _scatter(values: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor | None:
    """Back from the real positions (N,) to the padded layout (b, T), zeros on padding."""
    if values is None:
        return None
    return torch.zeros(real.shape, dtype=values.dtype, device=values.device).masked_scatter(real, values)

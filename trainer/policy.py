"""The policy and its critic: one base model, a LoRA policy adapter, a value head on the shared trunk.

One forward of a Llama-family decoder, split where the adapter starts (``PPOConfig.lora_layers``):

    tokens → embeddings → layers[:split] (frozen) → layers[split:] (LoRA "policy") → norm → lm_head, value head

Everything below ``split`` is the same for the policy and the reference and does not change during an update, so
``encode`` runs it once per batch under no-grad, and every later pass starts from its output: the reference
pass (the same weights with the adapter disabled: no second copy of the model), the proximal pass, and each
epoch's minibatches. The backward stops at ``split`` by itself, as nothing below it requires grad.

Sequences are right-padded (prompt, response, padding) with positions 0..L-1: padding comes after every real
token, so the plain causal mask is the whole mask (sdpa's ``is_causal`` path). Only the hidden states that
predict a response token reach the heads, and their log-probs come from ``trainer.lm_head`` in chunks.

Checkpoints: the adapter through ``liveloop.adapters.save_adapter``; the value head in its extra tensors; the
PPOConfig, version and β in its metadata under ``"ppo"``. ``load`` checks all three against this process.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from liveloop.adapters import EXTRA_TENSORS, save_adapter, verify_adapter
from trainer.config import PPOConfig
from trainer.lm_head import chosen_logprobs
from trainer.ppo import AdaptiveKLController

log = logging.getLogger(__name__)

POLICY_ADAPTER = "policy"
_VALUE_HEAD_PREFIX = "value_head."


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
    values: torch.Tensor | None  # V(s_t); None for the reference pass


class PolicyValueModel:
    """A peft model with the ``"policy"`` adapter, a value head, the optimizer, the version and β.

    Everything a PPO update reads or changes lives here, and ``save``/``load`` keep it together. The peft model
    may carry other adapters (the reward model's); they must be inactive whenever this class runs it.
    """

    def __init__(self, model: PeftModel, value_head: nn.Linear, config: PPOConfig, *, base_model_id: str,
                 version: int = 0, kl_coef: float | None = None) -> None:
        self.model, self.value_head, self.config = model, value_head, config
        self.base_model_id, self.version = base_model_id, version
        self.kl_ctl = AdaptiveKLController.from_config(config, kl_coef)
        self.causal_lm = model.get_base_model()
        self.decoder = self.causal_lm.get_decoder()
        self.split = config.lora_layers(len(self.decoder.layers))[0]
        lora = [p for n, p in model.named_parameters() if f".{POLICY_ADAPTER}." in n and "lora_" in n]
        self._trainable = [*lora, *value_head.parameters()]
        self.optimizer = torch.optim.AdamW(self._trainable, lr=config.learning_rate,
                                           eps=config.adam_eps, weight_decay=0.0)

    @classmethod
    def create(cls, base: PreTrainedModel, config: PPOConfig, *, base_model_id: str) -> PolicyValueModel:
        """Wrap the one base model with a fresh policy adapter (LoRA B = 0: it starts as the reference)."""
        model = get_peft_model(base, config.lora_config(base.config.num_hidden_layers), adapter_name=POLICY_ADAPTER)
        # zero init: V = 0 is the right guess for symmetric ±1 rewards, and no random critic gradient
        # reaches the shared trunk before the head has learnt anything
        value_head = nn.Linear(base.config.hidden_size, 1, device=base.device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        return cls(model.eval(), value_head, config, base_model_id=base_model_id)

    @classmethod
    def load(cls, base: PreTrainedModel, path: Path, config: PPOConfig, *, base_model_id: str,
             sha256: str | None = None) -> PolicyValueModel:
        """Resume from a saved version: verify the files, the base id and the config, then load."""
        manifest = verify_adapter(path, base_model_id=base_model_id, sha256=sha256)
        ppo = manifest["metadata"].get("ppo")
        if ppo is None:
            raise ValueError(f"{path} is not a policy checkpoint (no 'ppo' metadata)")
        config.check_resumable(ppo["config"])
        model = PeftModel.from_pretrained(base, path, adapter_name=POLICY_ADAPTER, is_trainable=True)
        tensors = load_file(path / EXTRA_TENSORS, device=str(base.device))
        state = {k.removeprefix(_VALUE_HEAD_PREFIX): v for k, v in tensors.items() if k.startswith(_VALUE_HEAD_PREFIX)}
        value_head = nn.Linear(base.config.hidden_size, 1, device=base.device)
        value_head.load_state_dict(state)
        return cls(model.eval(), value_head, config, base_model_id=base_model_id, version=ppo["version"],
                   kl_coef=ppo["kl_coef"])

    def save(self, dest: Path, *, metadata: dict | None = None) -> str:
        """Write adapter, value head and PPO state atomically to ``dest`` (never overwritten); return sha256."""
        ppo = {"config": self.config.to_dict(), "version": self.version, "kl_coef": self.kl_ctl.value}
        head = {_VALUE_HEAD_PREFIX + k: v.detach() for k, v in self.value_head.state_dict().items()}
        return save_adapter(self.model, POLICY_ADAPTER, dest, base_model_id=self.base_model_id,
                            metadata={**(metadata or {}), "ppo": ppo}, extra_tensors=head)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy adapter's LoRA weights and the value head: all that PPO changes."""
        return self._trainable

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings and the frozen layers below the adapter: (B, L) → hidden (B, L, H), once per batch."""
        with self._autocast():
            hidden = self.decoder.embed_tokens(input_ids.to(self.causal_lm.device))
            return self._layers(hidden, self.decoder.layers[:self.split])

    def heads(self, lower: torch.Tensor, batch: PaddedBatch, *, reference: bool = False) -> TokenOutputs:
        """The adapted layers from ``encode``'s output, then the heads at the response positions.

        ``reference``: adapter disabled, no grad, log-probs only. Otherwise log-probs and values, and when grad
        is enabled they are differentiable and the entropy comes too.
        """
        assert self.model.active_adapter == POLICY_ADAPTER, "another adapter is active on the shared model"
        adapter_off = self.model.disable_adapter() if reference else nullcontext()
        with adapter_off, torch.set_grad_enabled(torch.is_grad_enabled() and not reference), self._autocast():
            hidden = self._layers(lower[:, :batch.input_ids.shape[1]], self.decoder.layers[self.split:])
            picked = hidden.gather(1, batch.positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (b, T, H)
            real = batch.mask.bool()
            states = self.decoder.norm(picked[real])  # (N, H): response positions only, padding dropped
            temperature = batch.temperature[:, None].expand_as(batch.mask)[real]  # (N,)
            logprobs, entropy = chosen_logprobs(states, self.causal_lm.get_output_embeddings().weight,
                                                batch.response_ids[real], temperature, self.config.logits_chunk,
                                                entropy_grad=self.config.ent_coef != 0)
            values = None if reference else self.value_head(states).squeeze(-1).float()
        return TokenOutputs(_scatter(logprobs, real), _scatter(entropy, real), _scatter(values, real))

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

    def _autocast(self):
        return torch.autocast(self.causal_lm.device.type, dtype=torch.bfloat16, enabled=self.config.bf16_autocast)


def _scatter(values: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor | None:
    """Back from the real positions (N,) to the padded layout (b, T), zeros on padding."""
    if values is None:
        return None
    return torch.zeros(real.shape, dtype=values.dtype, device=values.device).masked_scatter(real, values)

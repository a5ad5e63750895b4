"""The one place that says what distribution a token was sampled from, and its log-probability.

The engine samples from ``sampling_logprobs(logits, temperature, top_p)`` and records the log-prob of the
chosen token under exactly that distribution (temperature-scaled, top-p truncated and renormalised); the
trainer and the invariant test recompute it with the same function. Anything else here (a faster top-p, a
different greedy rule) would silently break the importance ratio, so there is deliberately one copy.

Conventions: ``temperature == 0`` means greedy; its distribution is a point mass (log-prob 0 on the argmax).
Top-p keeps the smallest prefix of tokens, by descending probability, whose mass reaches ``top_p`` (always
at least one token), as Hugging Face's ``TopPLogitsWarper`` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from peft import PeftModel

# The smallest temperature above 0 (greedy). Tiny ones overflow logits / T in float32 (1e-40: inf logits, NaN
# log-probs); vLLM raises any temperature below 1e-2 to 1e-2, and so does the API.
MIN_TEMPERATURE = 0.01
# What ``SamplingParams.seed`` may be: torch's generators take a 64-bit seed.
SEED_RANGE = (-(2**63), 2**63 - 1)

# Top-p looks at this many best tokens first; rows whose nucleus is wider fall back to a full sort.
_NUCLEUS_CANDIDATES = 1024


@dataclass(frozen=True)
class SamplingParams:
    """What a request asked for; stored with every completion so its log-probs can be recomputed."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        return cls(**{**data, "stop": tuple(data.get("stop") or ())})


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs of the distribution actually sampled from.

    logits (N, V) any float dtype; temperature (N,), top_p (N,). Returns (N, V) float32 with ``-inf`` outside
    the nucleus. Computed in float32 whatever the model dtype, so the recorded number depends only on the logits.
    """
    logits = logits.float()
    greedy = temperature <= 0  # (N,)
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)  # (N, V)
    truncate = (top_p < 1) & ~greedy
    if truncate.any():
        rows = truncate.nonzero().squeeze(1)
        logp[rows] = _nucleus(logp[rows], top_p[rows].float())
    if greedy.any():
        rows = greedy.nonzero().squeeze(1)
        point = torch.full_like(logp[rows], float("-inf"))
        point.scatter_(1, logits[rows].argmax(dim=-1, keepdim=True), 0.0)
        logp[rows] = point
    return logp


def _nucleus(logp: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Restrict each row of log-probs (R, V) to its top-p nucleus and renormalise."""
    k = min(_NUCLEUS_CANDIDATES, logp.shape[-1])
    top_logp, top_idx = logp.topk(k, dim=-1)  # (R, k), sorted descending
    wide = top_logp.exp().sum(-1) < top_p
    if wide.any():  # the nucleus is wider than the candidates: sort the whole row
        top_logp, top_idx = logp.sort(dim=-1, descending=True)
    probs = top_logp.exp()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < top_p[:, None]  # the first token always stays
    kept_logp = top_logp.masked_fill(~keep, float("-inf"))
    kept_logp = kept_logp - torch.logsumexp(kept_logp, dim=-1, keepdim=True)
    return torch.full_like(logp, float("-inf")).scatter_(1, top_idx, kept_logp)


def sample(logp: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling from rows of log-probs (N, V) with one uniform draw per row (N,).

    Returns the chosen token ids (N,) and their log-probs (N,). One uniform per row lets every request keep
    its own seeded generator without a per-row multinomial call.
    """
    cdf = logp.exp().cumsum(dim=-1)  # (N, V)
    targets = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)
    # a zero-probability token can only be hit through rounding at the top end; step back to a real one
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    bad = torch.isinf(chosen)
    if bad.any():
        tokens[bad] = logp[bad].argmax(dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] without materialising the full log-softmax.

    logits (..., V), tokens (...); temperature a float or a tensor (..., 1), one per position. The differentiable
    training-side log-prob of the policy: temperature only, no top-p (a hard nucleus would give -inf and no
    gradient); the gap to the recorded behaviour log-prob is what the truncated importance weight corrects.
    """
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


# peft's name for "no adapter" in a mixed batch (``adapter_names``).
BASE_ADAPTER = "__base__"


@torch.inference_mode()
def sequence_logprobs(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int], params: SamplingParams,
                      adapter: str | None = None) -> list[float]:
    """Behaviour log-probs of a logged completion, recomputed with one full forward over prompt + response.

    Each entry is log π(response[t] | prompt, response[:t]) under ``sampling_logprobs`` with the completion's own
    temperature and top-p: what the engine recorded when it sampled the token. ``adapter`` picks the LoRA adapter
    of a peft model by name (None: the base with adapters off) through ``adapter_names``, which leaves the
    model's active adapter alone; peft allows that only in eval mode. A plain model takes ``adapter=None`` only.
    """
    if not response_ids:
        return []
    input_ids = torch.tensor([[*prompt_ids, *response_ids[:-1]]], device=model.device)
    logits = model(input_ids=input_ids, logits_to_keep=len(response_ids), **_adapter_kwargs(model, adapter)).logits
    n, device = len(response_ids), logits.device  # logits[0] (n, V): the positions predicting each response token
    temperature = torch.full((n,), float(params.temperature), device=device)
    logp = sampling_logprobs(logits[0], temperature, torch.full((n,), float(params.top_p), device=device))
    tokens = torch.tensor(response_ids, device=device)
    return logp.gather(1, tokens[:, None]).squeeze(1).tolist()


def _adapter_kwargs(model: torch.nn.Module, adapter: str | None) -> dict:
    if isinstance(model, PeftModel):  # select per call, never by switching the model's active adapter
        if adapter is not None and adapter not in model.peft_config:
            raise ValueError(f"adapter {adapter!r} is not loaded in this model")
        return {"adapter_names": [adapter or BASE_ADAPTER]}
    if adapter is not None:
        raise ValueError(f"adapter {adapter!r} requested but the model has no adapters")
    return {}

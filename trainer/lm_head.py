"""Chosen-token log-probs and entropies straight from final hidden states, a chunk of positions at a time.

PPO needs log π(a_t | s_t) of one token per position, but each is a log-softmax over the whole vocabulary
(49,152 for SmolLM2). Materialising (positions × vocab) logits for a batch costs hundreds of MB, and autograd
would keep them (and the softmax) alive until the backward. Here at most ``chunk`` positions' logits exist at a
time, and nothing of vocabulary size is kept for the backward.

Each position's log-prob depends only on its own hidden state h_t (logits z_t = W h_t / T), so its gradient is
one vector, computed in the forward while the chunk's logits exist:

    ∂ log π(a_t) / ∂h_t = (W[a_t] − p_t W) / T,        p_t = softmax(z_t)
    ∂ H_t / ∂h_t        = −(p_t ⊙ (log p_t + H_t)) W / T   (only when the entropy bonus is on)

and the backward is ``upstream_t · gradient_t``. That is the same two vocabulary-sized matmuls per position as
plain autograd (logits, then back through W), with a handful of in-place passes over the chunk's logits instead
of autograd's saved intermediates, and no recomputation as activation checkpointing would need. The log-prob
itself is ``liveloop.sampling.token_logprobs``, the one definition the serving side records μ with. W (the
lm_head, tied to the embeddings) is frozen: no gradient is computed for it.

Profiled on SmolLM2 (256 positions per chunk, one thread): autograd through ``token_logprobs`` and an entropy
spent more time in ~20 elementwise passes over (256 × 49,152) than in the two matmuls; this takes ~8 passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liveloop.sampling import token_logprobs


def chosen_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
                    chunk: int, *, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(h W^T / T)[a] per position, and (when grad flows) the entropy of softmax(h W^T / T).

    hidden (N, H), weight (V, H) frozen, tokens (N,), temperature (N,) → (logprobs (N,), entropy (N,) | None).
    Without grad only the log-probs are computed (the reference and proximal passes need nothing else). With
    grad they are differentiable w.r.t. ``hidden``; the entropy only if ``entropy_grad``.
    """
    assert not weight.requires_grad, "the lm_head is frozen: no gradient is computed for it"
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChosenLogprobs.apply(hidden, weight, tokens, temperature, chunk, entropy_grad)
    with torch.no_grad():
        return torch.cat([
            token_logprobs(F.linear(hidden[s:s + chunk], weight), tokens[s:s + chunk], temperature[s:s + chunk, None])
            for s in range(0, len(hidden), chunk)
        ]), None


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
           entropy_grad: bool) -> tuple[torch.Tensor, ...]:
    """One chunk (n positions): log-probs, entropies and their gradients w.r.t. hidden (module docstring)."""
    t = temperature[:, None]  # (n, 1)
    logits = F.linear(hidden, weight)  # (n, V)
    logprobs = token_logprobs(logits, tokens, t)  # (n,)
    scaled = logits.float().div_(t)  # z; in place when the logits are float32 already
    chosen = scaled.gather(1, tokens[:, None]).squeeze(1)
    log_p = scaled.sub_((chosen - logprobs)[:, None])  # log softmax(z), since lse(z) = z[a] − log p[a]
    p = log_p.exp()
    entropy = -torch.linalg.vecdot(p, log_p)  # (n,)
    logprob_grad = (weight[tokens].float() - p @ weight.float()) / t  # (n, H)
    if not entropy_grad:
        return logprobs, entropy, logprob_grad
    p.mul_(log_p.add_(entropy[:, None]))  # p ⊙ (log p + H)
    return logprobs, entropy, logprob_grad, -(p @ weight.float()) / t


class _ChosenLogprobs(torch.autograd.Function):
    """The differentiable path: per-position gradients computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, entropy_grad):
        pieces = [_chunk(hidden[s:s + chunk].detach(), weight, tokens[s:s + chunk], temperature[s:s + chunk],
                         entropy_grad) for s in range(0, len(hidden), chunk)]
        logprobs, entropy, *grads = (torch.cat(column) for column in zip(*pieces, strict=True))
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(*grads)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logprob_grad, *entropy_grad = ctx.saved_tensors  # (N, H) each
        grad_hidden = grad_logprobs[:, None] * logprob_grad
        if entropy_grad and grad_entropy is not None:
            grad_hidden = grad_hidden + grad_entropy[:, None] * entropy_grad[0]
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None

"""Chosen-token log-probs, entropies and the exact KL to the reference straight from final hidden states, a chunk
of positions at a time.

PPO needs log π(a_t | s_t) of one token per position, but each is a log-softmax over the whole vocabulary
(49,152 for SmolLM2). Materialising (positions × vocab) logits for a batch costs hundreds of MB, and autograd
would keep them (and the softmax) alive until the backward. Here at most ``chunk`` positions' logits exist at a
time, and nothing of vocabulary size is kept for the backward.

Each position's log-prob depends only on its own hidden state h_t (logits z_t = W h_t / T), so its gradient is
one vector, computed in the forward while the chunk's logits exist:

    ∂ log π(a_t) / ∂h_t = (W[a_t] − p_t W) / T,        p_t = softmax(z_t)
    ∂ H_t / ∂h_t        = −(p_t ⊙ (log p_t + H_t)) W / T   (only when the entropy bonus is on)
    ∂ KL_t / ∂h_t       = (π_t ⊙ (log π_t − log ρ_t − KL_t)) W   (KL_t = KL(π_t ‖ ρ_t) at temperature 1, where
                          ρ_t = softmax(W h_ref_t) is the reference's distribution from its own hidden state)

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
                    chunk: int, *, entropy_grad: bool = False, ref_hidden: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log softmax(h W^T / T)[a] per position, the entropy of softmax(h W^T / T), and KL(π ‖ π_ref) at T = 1.

    hidden (N, H), weight (V, H) frozen, tokens (N,), temperature (N,), ref_hidden (N, H) the reference's final
    states at the same positions or None → (logprobs (N,), entropy (N,) | None, kl (N,) | None). Without grad
    the entropy is not computed. With grad everything returned is differentiable w.r.t. ``hidden``, except the
    entropy unless ``entropy_grad``.
    """
    assert not weight.requires_grad, "the lm_head is frozen: no gradient is computed for it"
    if torch.is_grad_enabled() and hidden.requires_grad:
        ref = ref_hidden.detach() if ref_hidden is not None else None
        logprobs, entropy, kl = _ChosenLogprobs.apply(hidden, weight, tokens, temperature, chunk, entropy_grad, ref)
        return logprobs, entropy, kl if ref is not None else None
    with torch.no_grad():
        logprobs = torch.cat([
            token_logprobs(F.linear(hidden[s:s + chunk], weight), tokens[s:s + chunk], temperature[s:s + chunk, None])
            for s in range(0, len(hidden), chunk)
        ])
        kl = None if ref_hidden is None else torch.cat([
            _kl(F.linear(hidden[s:s + chunk], weight), F.linear(ref_hidden[s:s + chunk], weight))[0]
            for s in range(0, len(hidden), chunk)
        ])
        return logprobs, None, kl


def _kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(softmax(z) ‖ softmax(z_ref)) per row (n,), with softmax(z) and log softmax(z) − log softmax(z_ref)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    diff = log_p - torch.log_softmax(ref_logits.float(), dim=-1)
    p = log_p.exp_()
    return torch.linalg.vecdot(p, diff), p, diff


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
           entropy_grad: bool, ref_hidden: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One chunk (n positions): log-probs, entropies, KLs (zeros without a reference) and their gradients w.r.t.
    hidden (module docstring): (logprobs, entropy, kl, logprob_grad, kl_grad | None, entropy_grad | None)."""
    t = temperature[:, None]  # (n, 1)
    logits = F.linear(hidden, weight)  # (n, V)
    kl, kl_grad = torch.zeros(len(hidden), device=hidden.device), None
    if ref_hidden is not None:
        kl, p1, diff = _kl(logits, F.linear(ref_hidden, weight))
        kl_grad = (p1.mul_(diff.sub_(kl[:, None]))) @ weight.float()  # (n, H)
        del p1, diff
    logprobs = token_logprobs(logits, tokens, t)  # (n,)
    scaled = logits.float().div_(t)  # z; in place when the logits are float32 already
    chosen = scaled.gather(1, tokens[:, None]).squeeze(1)
    log_p = scaled.sub_((chosen - logprobs)[:, None])  # log softmax(z), since lse(z) = z[a] − log p[a]
    p = log_p.exp()
    entropy = -torch.linalg.vecdot(p, log_p)  # (n,)
    logprob_grad = (weight[tokens].float() - p @ weight.float()) / t  # (n, H)
    entropy_g = None
    if entropy_grad:
        p.mul_(log_p.add_(entropy[:, None]))  # p ⊙ (log p + H)
        entropy_g = -(p @ weight.float()) / t
    return logprobs, entropy, kl, logprob_grad, kl_grad, entropy_g


class _ChosenLogprobs(torch.autograd.Function):
    """The differentiable path: per-position gradients computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, entropy_grad, ref_hidden):
        pieces = [_chunk(hidden[s:s + chunk].detach(), weight, tokens[s:s + chunk], temperature[s:s + chunk],
                         entropy_grad, None if ref_hidden is None else ref_hidden[s:s + chunk])
                  for s in range(0, len(hidden), chunk)]
        logprobs, entropy, kl = (torch.cat([piece[i] for piece in pieces]) for i in range(3))
        grads = [torch.cat([piece[i] for piece in pieces]) if pieces[0][i] is not None else None for i in (3, 4, 5)]
        ctx.hidden_dtype = hidden.dtype
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        constants = [t for t, differentiable in ((entropy, entropy_grad), (kl, ref_hidden is not None))
                     if not differentiable]
        ctx.mark_non_differentiable(*constants)  # one call: a second would replace the first's list
        return logprobs, entropy, kl

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_kl):
        saved = iter(ctx.saved_tensors)
        logprob_grad, kl_grad, entropy_grad = (next(saved) if has else None for has in ctx.has)  # (N, H) each
        grad_hidden = grad_logprobs[:, None] * logprob_grad
        if kl_grad is not None and grad_kl is not None:
            grad_hidden = grad_hidden + grad_kl[:, None] * kl_grad
        if entropy_grad is not None and grad_entropy is not None:
            grad_hidden = grad_hidden + grad_entropy[:, None] * entropy_grad
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None, None

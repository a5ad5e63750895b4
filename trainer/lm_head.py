"""Chosen-token log-probs and entropies straight from final hidden states, a chunk of positions at a time.

PPO needs log π(a_t | s_t) of one token per position, but each is a log-softmax over the whole vocabulary
(49,152 for SmolLM2). Materialising (positions × vocab) logits for a batch costs hundreds of MB, and autograd
would keep them (and the softmax) alive until the backward. Here at most ``chunk`` positions' logits exist at a
time, and nothing of size vocab is kept for the backward:

each position's log-prob depends only on its own hidden state h_t, so its gradient is one vector
g_t = ∂ log π(a_t|h_t) / ∂h_t = (onehot(a_t) − softmax(z_t/T)) W / T. It is computed in the forward, while
the chunk's logits exist, and the backward is just ``upstream_t · g_t``. That is the same two vocab-sized
matmuls per position as plain autograd (logits, then W back), without recomputing the logits as activation
checkpointing would. The lm_head weight W is frozen (tied to the embeddings): no gradient is returned for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from liveloop.sampling import token_logprobs
from trainer.ppo import entropy_from_logits


def chosen_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
                    chunk: int, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h W^T / T)[a] and the entropy of softmax(h W^T / T), per position.

    hidden (N, H), weight (V, H) frozen, tokens (N,), temperature (N,) → (logprobs (N,), entropy (N,)), float32.
    Differentiable w.r.t. ``hidden`` when it requires grad; the entropy only when ``entropy_grad``.
    """
    assert not weight.requires_grad, "the lm_head is frozen: no gradient is computed for it"
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            pieces = [_chunk_outputs(hidden[s:s + chunk], weight, tokens[s:s + chunk], temperature[s:s + chunk])
                      for s in range(0, len(hidden), chunk)]
        return torch.cat([lp for lp, _ in pieces]), torch.cat([ent for _, ent in pieces])
    return _ChosenLogprobs.apply(hidden, weight, tokens, temperature, chunk, entropy_grad)


def _chunk_outputs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                   temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight)  # (n, V)
    return token_logprobs(logits, tokens, temperature[:, None]), entropy_from_logits(logits / temperature[:, None])


class _ChosenLogprobs(torch.autograd.Function):
    """The differentiable path: per-position gradients computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, entropy_grad):
        logprobs, entropies, logprob_grads, entropy_grads = [], [], [], []
        for s in range(0, len(hidden), chunk):
            with torch.enable_grad():
                h = hidden[s:s + chunk].detach().requires_grad_()
                logp, entropy = _chunk_outputs(h, weight, tokens[s:s + chunk], temperature[s:s + chunk])
                # positions are independent, so the gradient of the sum is each position's own gradient
                logprob_grads.append(torch.autograd.grad(logp.sum(), h, retain_graph=entropy_grad)[0])
                if entropy_grad:
                    entropy_grads.append(torch.autograd.grad(entropy.sum(), h)[0])
            logprobs.append(logp.detach())
            entropies.append(entropy.detach())
        ctx.entropy_grad, ctx.hidden_dtype = entropy_grad, hidden.dtype
        ctx.save_for_backward(torch.cat(logprob_grads), *([torch.cat(entropy_grads)] if entropy_grad else []))
        logprobs, entropies = torch.cat(logprobs), torch.cat(entropies)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logprob_grad, *entropy_grad = ctx.saved_tensors  # (N, H) each
        grad_hidden = grad_logprobs[:, None] * logprob_grad
        if ctx.entropy_grad and grad_entropy is not None:
            grad_hidden = grad_hidden + grad_entropy[:, None] * entropy_grad[0]
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None

"""Chunked chosen-token log-probs, entropies and KLs against a full log-softmax and autograd."""

from __future__ import annotations

import pytest
import torch

from trainer.lm_head import chosen_logprobs


def full_softmax_reference(hidden, weight, tokens, temperature):
    log_p = torch.log_softmax(hidden @ weight.T / temperature[:, None], dim=-1)  # (N, V)
    return log_p.gather(1, tokens[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_values_and_gradients_match_full_log_softmax(entropy_grad):
    generator = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101  # 37 positions: chunks of 8 leave a ragged last chunk
    hidden = torch.randn(n, h, generator=generator, requires_grad=True)
    weight = torch.randn(v, h, generator=generator)
    tokens = torch.randint(0, v, (n,), generator=generator)
    temperature = torch.rand(n, generator=generator) + 0.5  # a different temperature per position
    upstream_lp, upstream_ent = torch.randn(n, generator=generator), torch.randn(n, generator=generator)

    logprobs, entropy, kl = chosen_logprobs(hidden, weight, tokens, temperature, chunk=8, entropy_grad=entropy_grad)
    assert kl is None
    loss = (logprobs * upstream_lp).sum() + ((entropy * upstream_ent).sum() if entropy_grad else 0)
    (grad,) = torch.autograd.grad(loss, hidden)

    ref_lp, ref_ent = full_softmax_reference(hidden, weight, tokens, temperature)
    ref_loss = (ref_lp * upstream_lp).sum() + ((ref_ent * upstream_ent).sum() if entropy_grad else 0)
    (ref_grad,) = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(logprobs, ref_lp)
    torch.testing.assert_close(entropy, ref_ent)
    torch.testing.assert_close(grad, ref_grad)
    assert entropy.requires_grad == entropy_grad


def test_no_grad_path_gives_log_probs_only():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(10, 8, generator=generator), torch.randn(50, 8, generator=generator)
    tokens, temperature = torch.randint(0, 50, (10,), generator=generator), torch.full((10,), 0.7)
    with torch.no_grad():
        logprobs, entropy, kl = chosen_logprobs(hidden, weight, tokens, temperature, chunk=3)
    assert entropy is None and kl is None
    torch.testing.assert_close(logprobs, full_softmax_reference(hidden, weight, tokens, temperature)[0])


def test_exact_kl_to_the_reference_and_its_gradient_match_autograd():
    generator = torch.Generator().manual_seed(2)
    n, h, v = 21, 16, 101
    hidden = torch.randn(n, h, generator=generator, requires_grad=True)
    ref_hidden = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator)
    tokens = torch.randint(0, v, (n,), generator=generator)
    temperature = torch.full((n,), 0.7)  # the log-probs' temperature; the KL is between the models, at T = 1
    upstream_lp, upstream_kl = torch.randn(n, generator=generator), torch.randn(n, generator=generator)

    logprobs, _, kl = chosen_logprobs(hidden, weight, tokens, temperature, chunk=8, ref_hidden=ref_hidden)
    (grad,) = torch.autograd.grad((logprobs * upstream_lp).sum() + (kl * upstream_kl).sum(), hidden)

    log_p = torch.log_softmax(hidden @ weight.T, dim=-1)
    log_q = torch.log_softmax(ref_hidden @ weight.T, dim=-1)
    ref_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ref_lp = full_softmax_reference(hidden, weight, tokens, temperature)[0]
    (ref_grad,) = torch.autograd.grad((ref_lp * upstream_lp).sum() + (ref_kl * upstream_kl).sum(), hidden)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(grad, ref_grad)
    assert (kl >= 0).all()
    with torch.no_grad():  # the no-grad path measures the same KL
        torch.testing.assert_close(chosen_logprobs(hidden, weight, tokens, temperature, chunk=5,
                                                   ref_hidden=ref_hidden)[2], ref_kl)

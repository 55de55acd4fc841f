"""The KL-to-reference term: value, gradient, and its absence without a reference."""

import torch

from vespo_megatron.rl.heads import kl_penalty


def test_kl_penalty_gradient_is_score_function_estimate():
    sums = torch.tensor([-3.0, -5.0, -1.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -6.0, -1.5], dtype=torch.float64)
    term = kl_penalty(sums, {"ref_logprob_sums": ref}, kl_coef=0.3)
    assert torch.allclose(term.detach(), 0.3 * (sums.detach() - ref) * sums.detach())
    term.sum().backward()
    assert torch.allclose(sums.grad, 0.3 * (sums.detach() - ref))


def test_kl_penalty_is_zero_without_reference_or_coefficient():
    sums = torch.tensor([-3.0, -5.0], requires_grad=True)
    assert torch.equal(kl_penalty(sums, {}, kl_coef=0.3), torch.zeros(2))
    assert torch.equal(kl_penalty(sums, {"ref_logprob_sums": torch.zeros(2)}, kl_coef=0.0), torch.zeros(2))

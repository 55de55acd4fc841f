"""The VESPO kernel against an independent float64 NumPy implementation of docs/loss.md."""

import math

import numpy as np
import pytest
import torch

from vespo_megatron.loss import kernel
from vespo_megatron.loss.kernel import (
    phi_peak,
    sequence_log_ratio,
    train_inference_log_correction,
    train_inference_token_log_correction,
    vespo_log_w,
    vespo_phi,
)

DEFAULTS = dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)


def np_phi(log_w, adv, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """phi = W^k exp(lambda (1 - W)) with log W clamped to +-20, lambda floored at 1e-4."""
    log_w = np.clip(np.asarray(log_w, dtype=np.float64), -20.0, 20.0)
    adv = np.asarray(adv, dtype=np.float64)
    k = np.where(adv >= 0, k_pos, k_neg)
    lam = np.maximum(np.where(adv >= 0, lambda_pos, lambda_neg), 1e-4)
    with np.errstate(all="ignore"):
        w = np.exp(log_w)
        phi = w**k * np.exp(lam * (1.0 - w))
    return np.where(np.isfinite(phi), phi, 0.0)


def np_sequence_log_ratio(lp, base, mask):
    return np.where(mask, np.clip(lp - base, -20.0, 20.0), 0.0).sum(-1)


def test_phi_matches_numpy_random_and_extreme():
    gen = torch.Generator().manual_seed(0)
    log_w = torch.cat([
        torch.empty(400, dtype=torch.float64).uniform_(-60, 60, generator=gen),
        torch.tensor([0.0, -60.0, 60.0, -20.0, 20.0, 1e-9, -1e-9], dtype=torch.float64),
    ])
    adv = torch.randn(log_w.shape[0], generator=gen, dtype=torch.float64)
    adv[::5] = 0.0
    for params in (DEFAULTS, dict(k_pos=1.0, lambda_pos=1.0, k_neg=0.5, lambda_neg=5.0)):
        got = vespo_phi(log_w, adv, **params).numpy()
        np.testing.assert_allclose(got, np_phi(log_w.numpy(), adv.numpy(), **params), rtol=1e-12, atol=1e-300)


def test_phi_float32_close_to_float64_reference():
    log_w = torch.linspace(-60, 60, 1001)
    adv = torch.where(torch.arange(1001) % 2 == 0, 1.0, -1.0)
    got = vespo_phi(log_w, adv).double().numpy()
    np.testing.assert_allclose(got, np_phi(log_w.double().numpy(), adv.numpy()), rtol=2e-4, atol=1e-30)


@pytest.mark.parametrize("k,lam", [(2.0, 3.0), (3.0, 2.0), (1.0, 1.0), (0.0, 0.5), (5.0, 0.1)])
def test_phi_at_one_is_one(k, lam):
    phi = vespo_phi(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, -1.0]), k, lam, k, lam)
    np.testing.assert_allclose(phi.numpy(), 1.0, rtol=1e-14)


@pytest.mark.parametrize("k,lam", [(2.0, 3.0), (3.0, 2.0), (1.5, 0.7)])
def test_peak_location_and_value(k, lam):
    w_star, phi_star = phi_peak(k, lam)
    assert w_star == pytest.approx(k / lam)
    assert phi_star == pytest.approx((k / lam) ** k * math.exp(lam - k))
    log_w = torch.linspace(math.log(w_star) - 3, math.log(w_star) + 3, 200001, dtype=torch.float64)
    phi = vespo_phi(log_w, torch.ones_like(log_w), k, lam, k, lam)
    assert math.exp(log_w[phi.argmax()].item()) == pytest.approx(w_star, rel=1e-3)
    assert phi.max().item() == pytest.approx(phi_star, rel=1e-9)
    assert (phi <= phi_star * (1 + 1e-12)).all()


def test_phi_vanishes_at_both_ends():
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for log_w in (-19.0, 8.0):
        assert (vespo_phi(torch.full((2,), log_w, dtype=torch.float64), adv) < 1e-15).all()


@pytest.mark.parametrize("k,lam", [(1.0, 2.0), (2.0, 3.0), (3.0, 2.0)])
def test_phi_over_w_bounded_when_k_at_least_one(k, lam):
    w = np.logspace(-8, 2, 2000)  # inside the +-20 clamp on log W
    ratio = np_phi(np.log(w), np.ones_like(w), k, lam, k, lam) / w
    bound = math.exp(lam) if k == 1 else ((k - 1) / lam) ** (k - 1) * math.exp(lam - (k - 1))
    assert ratio.max() <= bound * (1 + 1e-9)
    assert ratio.max() >= bound * (1 - 1e-3)


def test_phi_non_finite_becomes_zero():
    log_w = torch.tensor([float("nan"), 0.0, float("inf"), -float("inf")])
    phi = vespo_phi(log_w, torch.ones(4))
    assert torch.isfinite(phi).all()
    assert phi[0] == 0 and phi[1] == pytest.approx(1.0)
    # +-inf are clamped to +-20 first: phi(e^20) underflows to 0, phi(e^-20) = e^(3 - 40 - 3 e^-20).
    assert phi[2] == 0
    assert phi[3].item() == pytest.approx(np_phi(-20.0, 1.0), rel=1e-5)


def test_lambda_floor():
    log_w = torch.tensor([0.5], dtype=torch.float64)
    got = vespo_phi(log_w, torch.ones(1), 2.0, 0.0, 2.0, 0.0)
    np.testing.assert_allclose(got.numpy(), np_phi(0.5, 1.0, 2.0, 1e-4, 2.0, 1e-4), rtol=1e-12)


def test_phi_is_detached():
    log_w = torch.randn(5, requires_grad=True)
    adv = torch.randn(5, requires_grad=True)
    phi = vespo_phi(log_w, adv)
    assert not phi.requires_grad and phi.grad_fn is None


def test_sequence_log_ratio_clamps_each_token_then_sums():
    gen = torch.Generator().manual_seed(1)
    lp = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 15
    base = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 15
    mask = torch.rand(4, 7, generator=gen) > 0.3
    got = sequence_log_ratio(lp, base, mask).numpy()
    np.testing.assert_allclose(got, np_sequence_log_ratio(lp.numpy(), base.numpy(), mask.numpy()), rtol=1e-12)


def test_vespo_log_w_adds_correction_then_clamps_and_detaches():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -1.0], [-30.0, -30.0, -30.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    log_w = vespo_log_w(lp, old, mask, torch.tensor([0.25, 0.0]))
    assert not log_w.requires_grad
    np.testing.assert_allclose(log_w.numpy(), [1.5 + 0.25, 20.0], rtol=1e-6)


# ---------------------------------------------------------------------------- train/inference correction


def _correction_case():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(5, 6, generator=gen, dtype=torch.float64) * 3
    sampler = old + torch.randn(5, 6, generator=gen, dtype=torch.float64) * 0.4
    mask = torch.rand(5, 6, generator=gen) > 0.2
    mask[4] = False  # a row without response tokens
    return old, sampler, mask


def test_correction_none_is_zero_and_keeps_everything():
    old, sampler, mask = _correction_case()
    term, keep = train_inference_log_correction(old, sampler, mask, "none")
    assert (term == 0).all() and keep.all()


def test_tis_sequence_and_token_match_numpy():
    old, sampler, mask = _correction_case()
    o, s, mk = old.numpy(), sampler.numpy(), mask.numpy()
    d = np.where(mk, np.clip(o - s, -20, 20), 0.0)
    term, keep = train_inference_log_correction(old, sampler, mask, "tis", "sequence", tis_threshold=1.5)
    np.testing.assert_allclose(term.numpy(), np.minimum(d.sum(-1), np.log(1.5)), rtol=1e-12)
    assert keep.all()
    term, keep = train_inference_log_correction(old, sampler, mask, "tis", "token", tis_threshold=1.5)
    np.testing.assert_allclose(term.numpy(), np.where(mk, np.minimum(d, np.log(1.5)), 0).sum(-1), rtol=1e-12)
    assert keep.all()


def test_mis_sequence_and_token_match_numpy():
    old, sampler, mask = _correction_case()
    o, s, mk = old.numpy(), sampler.numpy(), mask.numpy()
    d = np.where(mk, np.clip(o - s, -20, 20), 0.0)
    lo, hi = 0.7, 1.4
    term, keep = train_inference_log_correction(old, sampler, mask, "mis", "sequence", mis_lower=lo, mis_upper=hi)
    ratio = np.exp(d.sum(-1))
    want_keep = (ratio >= lo) & (ratio <= hi)
    np.testing.assert_array_equal(keep.numpy(), want_keep)
    np.testing.assert_allclose(term.numpy(), np.where(want_keep, d.sum(-1), 0.0), rtol=1e-12)

    term_tok, keep_tok = train_inference_token_log_correction(old, sampler, mask, "mis", mis_lower=lo, mis_upper=hi)
    want_tok = mk & (np.exp(d) >= lo) & (np.exp(d) <= hi)
    np.testing.assert_array_equal(keep_tok.numpy(), want_tok)
    term, keep = train_inference_log_correction(old, sampler, mask, "mis", "token", mis_lower=lo, mis_upper=hi)
    np.testing.assert_array_equal(keep.numpy(), (want_tok | ~mk).all(-1))
    np.testing.assert_allclose(term.numpy(), np.where(want_tok, d, 0.0).sum(-1), rtol=1e-12)
    assert keep[4]  # empty row: nothing to reject


def test_mis_can_reject():
    old = torch.zeros(2, 2)
    sampler = torch.tensor([[0.0, 0.0], [-2.0, 0.0]])  # second sequence ratio e^2 > upper
    _, keep = train_inference_log_correction(old, sampler, torch.ones(2, 2), "mis", "sequence")
    assert keep.tolist() == [True, False]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mode="bogus"), "correction.mode"),
        (dict(mode="tis", level="word"), "correction.level"),
        (dict(mode="tis", tis_threshold=0.0), "correction.tis_threshold"),
        (dict(mode="mis", mis_lower=2.0, mis_upper=1.0), "correction.mis_lower"),
    ],
)
def test_correction_bad_arguments_name_the_field(kwargs, field):
    old, sampler, mask = _correction_case()
    with pytest.raises(ValueError, match=field):
        train_inference_log_correction(old, sampler, mask, **kwargs)


def test_constants():
    assert kernel.LOG_RATIO_CLAMP == 20.0 and kernel.LOG_W_CLAMP == 20.0

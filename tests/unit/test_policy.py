"""VESPO and the baselines against independent NumPy references (values and gradients)."""

import math

import numpy as np
import pytest
import torch

from vespo_megatron.loss import metrics as m
from vespo_megatron.loss.policy import (
    CispoParams,
    CorrectionParams,
    GrpoParams,
    GspoParams,
    PolicyLossInputs,
    SapoParams,
    VespoParams,
    cispo_loss,
    get_policy_loss,
    grpo_loss,
    gspo_loss,
    sapo_loss,
    vespo_loss,
    vespo_sequence_loss,
)


def make_case(seed=0, batch=6, seq=9, scale=0.3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=gen, dtype=dtype) * 2 - 0.05
    logprobs = (old + torch.randn(batch, seq, generator=gen, dtype=dtype) * scale).requires_grad_(True)
    sampler = old + torch.randn(batch, seq, generator=gen, dtype=dtype) * 0.2
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):
        start = int(torch.randint(0, 3, (1,), generator=gen))
        length = int(torch.randint(1, seq - start + 1, (1,), generator=gen))
        mask[row, start:start + length] = True
    adv = torch.randn(batch, generator=gen, dtype=dtype)
    adv[0] = 0.0
    return PolicyLossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv, response_mask=mask,
                            sampler_logprobs=sampler)


def arrays(inputs):
    return (inputs.logprobs.detach().numpy(), inputs.old_logprobs.numpy(), inputs.advantages.numpy(),
            inputs.response_mask.numpy())


def grad_of_sum(token_loss, inputs):
    (grad,) = torch.autograd.grad(token_loss.sum(), inputs.logprobs)
    return grad.numpy()


def np_phi(log_w, adv, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    log_w = np.clip(log_w, -20, 20)
    k = np.where(adv >= 0, k_pos, k_neg)
    lam = np.where(adv >= 0, lambda_pos, lambda_neg)
    phi = np.exp(log_w) ** k * np.exp(lam * (1 - np.exp(log_w)))
    return np.where(np.isfinite(phi), phi, 0.0)


# ------------------------------------------------------------------------------------------ VESPO


def np_vespo(lp, old, adv, mask, length_normalize=False, log_term=None, keep=None):
    log_w = np.where(mask, np.clip(lp - old, -20, 20), 0).sum(-1)
    if log_term is not None:
        log_w = log_w + log_term
    phi = np_phi(np.clip(log_w, -20, 20), adv)
    if keep is not None:
        phi = phi * keep
    coef = phi * adv
    if length_normalize:
        coef = coef / np.maximum(mask.sum(-1), 1)
    token_loss = np.where(mask, -coef[:, None] * lp, 0.0)
    grad = np.where(mask, -coef[:, None], 0.0)
    return token_loss, grad


@pytest.mark.parametrize("length_normalize", [False, True])
def test_vespo_values_and_gradient(length_normalize):
    inputs = make_case(seed=3)
    out = vespo_loss(inputs, VespoParams(length_normalize=length_normalize))
    want_loss, want_grad = np_vespo(*arrays(inputs), length_normalize=length_normalize)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-15)
    # The gradient is REINFORCE scaled by the detached phi: d/d logp_t = -phi A (/ L).
    np.testing.assert_allclose(grad_of_sum(out.token_loss, inputs), want_grad, rtol=1e-12, atol=1e-15)


def test_vespo_gradient_is_phi_times_reinforce_through_a_model():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = logp.detach() + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    inputs = PolicyLossInputs(logprobs=logp, old_logprobs=old, advantages=adv,
                              response_mask=torch.ones(3, 4, dtype=torch.bool))
    out = vespo_loss(inputs, VespoParams())
    (grad,) = torch.autograd.grad(out.token_loss.sum(), logits)
    phi = np_phi((logp.detach() - old).sum(-1).numpy(), adv.numpy())
    # Hand formula: -sum_seq phi A grad(sum_t log pi), with grad log pi = onehot - softmax.
    probs = torch.softmax(logits.detach(), -1).numpy()
    onehot = np.eye(5)[tokens.numpy()]
    want = -(phi * adv.numpy())[:, None, None] * (onehot - probs)
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-10, atol=1e-14)


def test_vespo_sequence_form_matches_token_form():
    inputs = make_case(seed=4)
    for length_normalize in (False, True):
        params = VespoParams(length_normalize=length_normalize)
        token = vespo_loss(inputs, params).token_loss.sum(-1)
        mask = inputs.response_mask
        logprob_sum = torch.where(mask, inputs.logprobs, 0.0).sum(-1)
        log_w = torch.where(mask, inputs.logprobs - inputs.old_logprobs, 0.0).sum(-1)
        seq = vespo_sequence_loss(logprob_sum, log_w, inputs.advantages, params,
                                  response_lengths=inputs.response_lengths)
        torch.testing.assert_close(seq.seq_loss, token, rtol=1e-12, atol=1e-14)
        g_tok = torch.autograd.grad(token.sum(), inputs.logprobs)[0]
        g_seq = torch.autograd.grad(seq.seq_loss.sum(), inputs.logprobs)[0]
        torch.testing.assert_close(g_seq, g_tok)


def test_vespo_sequence_form_needs_lengths_for_length_normalize():
    with pytest.raises(ValueError, match="length_normalize"):
        vespo_sequence_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), VespoParams(length_normalize=True))


def test_vespo_with_tis_and_mis_corrections():
    inputs = make_case(seed=5)
    lp, old, adv, mask = arrays(inputs)
    sampler = inputs.sampler_logprobs.numpy()
    d = np.where(mask, old - sampler, 0).sum(-1)
    out = vespo_loss(inputs, VespoParams(correction=CorrectionParams(mode="tis", tis_threshold=1.1)))
    want, _ = np_vespo(lp, old, adv, mask, log_term=np.minimum(d, math.log(1.1)))
    np.testing.assert_allclose(out.token_loss.detach().numpy(), want, rtol=1e-12, atol=1e-15)

    out = vespo_loss(inputs, VespoParams(correction=CorrectionParams(mode="mis", mis_lower=0.8, mis_upper=1.25)))
    keep = (np.exp(d) >= 0.8) & (np.exp(d) <= 1.25)
    assert 0 < keep.sum() < len(keep)
    want, _ = np_vespo(lp, old, adv, mask, log_term=np.where(keep, d, 0), keep=keep)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), want, rtol=1e-12, atol=1e-15)
    assert out.metrics["correction/keep_frac"] == pytest.approx(keep.mean())


def test_symmetric_kernel_is_just_config():
    inputs = make_case(seed=6)
    out = vespo_loss(inputs, VespoParams(k_pos=2.0, lambda_pos=2.0, k_neg=2.0, lambda_neg=2.0))
    lp, old, adv, mask = arrays(inputs)
    log_w = np.where(mask, lp - old, 0).sum(-1)
    phi = np.exp(2 * log_w + 2 * (1 - np.exp(log_w)))
    np.testing.assert_allclose(out.token_loss.detach().numpy(), np.where(mask, -(phi * adv)[:, None] * lp, 0),
                               rtol=1e-12, atol=1e-15)


def test_vespo_metrics_against_numpy():
    inputs = make_case(seed=7, batch=10, scale=0.6)
    out = vespo_loss(inputs, VespoParams())
    lp, old, adv, mask = arrays(inputs)
    log_w = np.clip(np.where(mask, lp - old, 0).sum(-1), -20, 20)
    phi = np_phi(log_w, adv)
    pos = adv >= 0
    met = out.metrics
    assert met["vespo/log_w_abs_mean"] == pytest.approx(np.abs(log_w).mean())
    assert met["vespo/log_w_abs_max"] == pytest.approx(np.abs(log_w).max())
    assert met["vespo/phi_mean_pos"] == pytest.approx(phi[pos].mean())
    assert met["vespo/phi_min_neg"] == pytest.approx(phi[~pos].min())
    assert met["vespo/phi_max_neg"] == pytest.approx(phi[~pos].max())
    assert met["vespo/num_pos"] == pos.sum()
    assert met["vespo/silenced_frac"] == pytest.approx((phi < 1e-3).mean())
    assert met["vespo/ess"] == pytest.approx(phi.sum() ** 2 / (len(phi) * (phi**2).sum()))
    r = np.exp(lp - old)
    assert met["kl/k1"] == pytest.approx((old - lp)[mask].mean())
    assert met["kl/k3"] == pytest.approx((r - 1 - np.log(r))[mask].mean())
    assert met["response/length_mean"] == pytest.approx(mask.sum(-1).mean())
    assert all(isinstance(v, float) for v in met.values())


def test_metrics_edge_cases():
    assert m.effective_sample_size(torch.zeros(4)).item() == 0.0
    assert m.effective_sample_size(torch.ones(4)).item() == pytest.approx(1.0)
    met = m.vespo_metrics(torch.zeros(3), torch.ones(3), torch.ones(3))
    assert math.isnan(met["vespo/phi_mean_neg"]) and met["vespo/num_neg"] == 0


# -------------------------------------------------------------------------------------- baselines


def np_grpo(lp, old, adv, mask, eps_low, eps_high, c):
    r = np.exp(np.clip(lp - old, -20, 20))
    a = adv[:, None]
    loss = np.maximum(-a * r, -a * np.clip(r, 1 - eps_low, 1 + eps_high))
    if c is not None:
        loss = np.where(a < 0, np.minimum(loss, -a * c), loss)
    return np.where(mask, loss, 0.0)


def finite_difference(fn, x, h=1e-6):
    """Central differences of sum(fn(x)) with respect to every entry of x (float64)."""
    x = x.detach().clone()
    grad = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.clone(), x.clone()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(plus).sum() - fn(minus).sum()) / (2 * h)
    return grad


@pytest.mark.parametrize("c", [3.0, None])
def test_grpo_values_and_gradient(c):
    inputs = make_case(seed=8, scale=0.5)
    params = GrpoParams(eps_low=0.2, eps_high=0.28, dual_clip_c=c)
    out = grpo_loss(inputs, params)
    lp, old, adv, mask = arrays(inputs)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), np_grpo(lp, old, adv, mask, 0.2, 0.28, c),
                               rtol=1e-12, atol=1e-15)
    fd = finite_difference(lambda x: np_grpo(x.numpy(), old, adv, mask, 0.2, 0.28, c), inputs.logprobs)
    np.testing.assert_allclose(grad_of_sum(out.token_loss, inputs), fd, rtol=1e-5, atol=1e-7)
    r = np.exp(lp - old)
    clipped = np.where(adv[:, None] >= 0, r > 1.28, r < 0.8) & (adv[:, None] != 0)
    assert out.metrics["grpo/clip_frac"] == pytest.approx(clipped[mask].mean())


def test_grpo_dual_clip_caps_negative_advantage_loss():
    inputs = PolicyLossInputs(logprobs=torch.tensor([[3.0]], requires_grad=True), old_logprobs=torch.zeros(1, 1),
                              advantages=torch.tensor([-2.0]), response_mask=torch.ones(1, 1))
    out = grpo_loss(inputs, GrpoParams(dual_clip_c=3.0))
    assert out.token_loss.item() == pytest.approx(6.0)  # min(2 e^3, 3 * 2)
    assert out.metrics["grpo/dual_clip_frac"] == 1.0
    assert grad_of_sum(out.token_loss, inputs).item() == 0.0


def np_gspo(lp, old, adv, mask, eps_low, eps_high):
    length = np.maximum(mask.sum(-1), 1)
    s = np.exp(np.where(mask, np.clip(lp - old, -20, 20), 0).sum(-1) / length)[:, None]
    a = adv[:, None]
    unclipped, clipped = -a * s, -a * np.clip(s, 1 - eps_low, 1 + eps_high)
    loss = np.maximum(unclipped, clipped)
    # d(token loss)/d logp_t: the token form has value s and derivative s; zero where the clip is active.
    grad = np.where(clipped > unclipped, 0.0, -a * s)
    return np.where(mask, loss, 0.0), np.where(mask, grad, 0.0)


def test_gspo_values_and_gradient():
    inputs = make_case(seed=9, scale=0.01)
    for eps_low, eps_high in ((3e-4, 4e-4), (0.2, 0.2)):
        out = gspo_loss(inputs, GspoParams(eps_low=eps_low, eps_high=eps_high))
        want_loss, want_grad = np_gspo(*arrays(inputs), eps_low, eps_high)
        np.testing.assert_allclose(out.token_loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(grad_of_sum(out.token_loss, inputs), want_grad, rtol=1e-12, atol=1e-15)


def test_gspo_sequence_gradient_matches_paper_with_token_mean_per_sequence():
    # Paper: grad J_i = s_i A_i (1/|y|) sum_t grad log pi(y_t) when unclipped.
    inputs = make_case(seed=10, scale=1e-5)
    out = gspo_loss(inputs, GspoParams(eps_low=0.5, eps_high=0.5))
    lengths = inputs.response_lengths.double().unsqueeze(-1)
    (grad,) = torch.autograd.grad((out.token_loss / lengths).sum(), inputs.logprobs)
    lp, old, adv, mask = arrays(inputs)
    s = np.exp(np.where(mask, lp - old, 0).sum(-1) / mask.sum(-1))
    want = np.where(mask, -(s * adv)[:, None] / mask.sum(-1, keepdims=True), 0)
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-15)


def np_sapo(lp, old, adv, mask, tau_pos, tau_neg):
    r = np.exp(np.clip(lp - old, -20, 20))
    tau = np.where(adv[:, None] > 0, tau_pos, tau_neg)
    f = 4 / tau / (1 + np.exp(-tau * (r - 1)))
    return np.where(mask, -f * adv[:, None], 0.0)


def test_sapo_values_and_gradient():
    inputs = make_case(seed=11, scale=0.7)
    out = sapo_loss(inputs, SapoParams(tau_pos=1.0, tau_neg=1.05))
    lp, old, adv, mask = arrays(inputs)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), np_sapo(lp, old, adv, mask, 1.0, 1.05),
                               rtol=1e-12, atol=1e-15)
    fd = finite_difference(lambda x: np_sapo(x.numpy(), old, adv, mask, 1.0, 1.05), inputs.logprobs)
    np.testing.assert_allclose(grad_of_sum(out.token_loss, inputs), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.05, 4.0])
def test_sapo_gate_has_unit_slope_at_ratio_one(tau):
    # At r = 1 the gate matches the unclipped surrogate's gradient: d f / d r = 1.
    from vespo_megatron.loss.policy import sapo_gate

    r = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(sapo_gate(r, tau).sum(), r)
    assert slope.item() == pytest.approx(1.0, rel=1e-12)


def np_cispo(lp, old, adv, mask, eps_low, eps_high):
    r = np.exp(np.clip(lp - old, -20, 20))
    w = np.clip(r, 1 - eps_low, 1 + eps_high)
    a = adv[:, None]
    return np.where(mask, -w * a * lp, 0.0), np.where(mask, -w * a, 0.0)


@pytest.mark.parametrize("eps_low,eps_high", [(1.0, 0.28), (0.2, 0.2)])
def test_cispo_values_and_gradient(eps_low, eps_high):
    inputs = make_case(seed=12, scale=0.5)
    out = cispo_loss(inputs, CispoParams(eps_low=eps_low, eps_high=eps_high))
    want_loss, want_grad = np_cispo(*arrays(inputs), eps_low, eps_high)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_of_sum(out.token_loss, inputs), want_grad, rtol=1e-12, atol=1e-15)
    lp, old, _, mask = arrays(inputs)
    assert out.metrics["cispo/clip_frac_high"] == pytest.approx((np.exp(lp - old) > 1 + eps_high)[mask].mean())


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_baseline_tis_weight(level):
    inputs = make_case(seed=13)
    lp, old, adv, mask = arrays(inputs)
    d = np.where(mask, old - inputs.sampler_logprobs.numpy(), 0)
    cap = math.log(1.2)
    weight = np.exp(np.minimum(d.sum(-1), cap))[:, None] if level == "sequence" else np.exp(np.minimum(d, cap))
    out = cispo_loss(inputs, CispoParams(correction=CorrectionParams(mode="tis", level=level, tis_threshold=1.2)))
    want, _ = np_cispo(lp, old, adv, mask, 1.0, 0.28)
    np.testing.assert_allclose(out.token_loss.detach().numpy(), want * weight, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["vespo", "grpo", "gspo", "sapo", "cispo"])
def test_registry_losses_zero_off_mask_and_finite_grads(name):
    inputs = make_case(seed=14, dtype=torch.float32)
    with torch.no_grad():
        inputs.logprobs[~inputs.response_mask] = float("nan")  # garbage on padding must not leak
    loss = get_policy_loss(name)
    out = loss(inputs)
    assert (out.token_loss[~inputs.response_mask] == 0).all()
    assert torch.isfinite(out.token_loss).all()
    assert np.isfinite(grad_of_sum(out.token_loss, inputs)).all()


def test_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"loss.name='ppo'.*cispo.*grpo.*gspo.*sapo.*vespo"):
        get_policy_loss("ppo")


def test_registry_make_params_and_type_check():
    loss = get_policy_loss("vespo")
    params = loss.make_params(k_pos=1.5, correction={"mode": "tis"})
    assert isinstance(params, VespoParams) and params.correction.mode == "tis"
    assert GrpoParams(correction={"mode": "mis", "level": "token"}).correction.level == "token"
    with pytest.raises(ValueError, match="correction.mode"):
        SapoParams(correction={"mode": "bogus"})
    with pytest.raises(TypeError, match="VespoParams"):
        loss(make_case(), GrpoParams())


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cls,kwargs,field",
    [
        (VespoParams, dict(k_pos=-1.0), "vespo.k_pos"),
        (VespoParams, dict(k_neg=-0.1), "vespo.k_neg"),
        (VespoParams, dict(lambda_pos=0.0), "vespo.lambda_pos"),
        (VespoParams, dict(lambda_neg=-1.0), "vespo.lambda_neg"),
        (GrpoParams, dict(eps_low=1.0), "grpo.eps_low"),
        (GrpoParams, dict(eps_high=-0.1), "grpo.eps_high"),
        (GrpoParams, dict(dual_clip_c=1.0), "grpo.dual_clip_c"),
        (GspoParams, dict(eps_low=-1e-4), "gspo.eps_low"),
        (SapoParams, dict(tau_neg=0.0), "sapo.tau_neg"),
        (CispoParams, dict(eps_low=1.5), "cispo.eps_low"),
        (CispoParams, dict(eps_high=-1.0), "cispo.eps_high"),
        (CorrectionParams, dict(mode="is"), "correction.mode"),
        (CorrectionParams, dict(mode="mis", mis_lower=3.0), "correction.mis_lower"),
    ],
)
def test_bad_params_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def _fields(**overrides):
    inputs = make_case(seed=15)
    base = dict(logprobs=inputs.logprobs, old_logprobs=inputs.old_logprobs, advantages=inputs.advantages,
                response_mask=inputs.response_mask, sampler_logprobs=inputs.sampler_logprobs)
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(old_logprobs=torch.zeros(6, 8)), "old_logprobs"),
        (dict(sampler_logprobs=torch.zeros(5, 9)), "sampler_logprobs"),
        (dict(response_mask=torch.ones(6, 9, 1)), "response_mask"),
        (dict(advantages=torch.zeros(6, 9)), "advantages"),
        (dict(logprobs=torch.zeros(6)), "logprobs"),
    ],
)
def test_bad_shapes_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"PolicyLossInputs.{field}"):
        PolicyLossInputs(**_fields(**overrides))


def _with_value(name, row, col, value):
    tensor = _fields()[name].detach().clone()
    tensor[row, col] = value
    return tensor


def test_validate_rejects_bad_values():
    mask = _fields()["response_mask"]
    row, col = [int(i) for i in mask.nonzero()[0]]
    for name in ("old_logprobs", "sampler_logprobs", "logprobs"):
        inputs = PolicyLossInputs(**_fields(**{name: _with_value(name, row, col, float("nan"))}))
        with pytest.raises(ValueError, match=f"PolicyLossInputs.{name}.*non-finite"):
            inputs.validate()
    adv = _fields()["advantages"].clone()
    adv[1] = float("inf")
    with pytest.raises(ValueError, match="PolicyLossInputs.advantages"):
        PolicyLossInputs(**_fields(advantages=adv)).validate()
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"PolicyLossInputs.response_mask.*\[2\]"):
        PolicyLossInputs(**_fields(response_mask=empty)).validate()
    PolicyLossInputs(**_fields(response_mask=empty)).validate(allow_empty_rows=True)
    with pytest.raises(ValueError, match="PolicyLossInputs.response_mask.*0 and 1"):
        PolicyLossInputs(**_fields(response_mask=mask.double() * 2)).validate()


def test_validate_ignores_non_finite_off_mask():
    mask = _fields()["response_mask"]
    row, col = [int(i) for i in (~mask).nonzero()[0]]
    PolicyLossInputs(**_fields(old_logprobs=_with_value("old_logprobs", row, col, float("-inf")))).validate()


def test_correction_without_sampler_logprobs_names_the_field():
    inputs = PolicyLossInputs(**_fields(sampler_logprobs=None))
    for name in ("vespo", "grpo"):
        loss = get_policy_loss(name)
        with pytest.raises(ValueError, match="PolicyLossInputs.sampler_logprobs"):
            loss(inputs, loss.make_params(correction={"mode": "tis"}))

"""Aggregation modes against NumPy, and gradients independent of the micro-batch split."""

import numpy as np
import pytest
import torch

from vespo_megatron.loss.aggregate import AGGREGATION_MODES, aggregate_sequence_loss, aggregate_token_loss
from vespo_megatron.loss.policy import PolicyLossInputs, get_policy_loss


def make_batch(seed=0, batch=8, seq=10):
    gen = torch.Generator().manual_seed(seed)
    token_loss = torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):
        length = int(torch.randint(1, seq + 1, (1,), generator=gen))
        mask[row, seq - length:] = True
    return token_loss, mask


def np_aggregate(loss, mask, mode, n_tok=None, n_seq=None):
    per_seq = np.where(mask, loss, 0).sum(-1)
    lengths = mask.sum(-1)
    n_tok_local, n_seq_local = lengths.sum(), (lengths > 0).sum()
    if mode == "token-mean":
        return per_seq.sum() / (n_tok if n_tok is not None else n_tok_local)
    if mode == "micro-token-mean":  # one micro-batch (no global micro-batch count passed)
        return per_seq.sum() / n_tok_local
    if mode == "seq-mean-token-sum":
        return per_seq.sum() / (n_seq if n_seq is not None else n_seq_local)
    per_seq_mean = per_seq / np.maximum(lengths, 1)
    return per_seq_mean.sum() / (n_seq if n_seq is not None else n_seq_local)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("globals_", [(None, None), (200, 40)])
def test_token_aggregation_matches_numpy(mode, globals_):
    token_loss, mask = make_batch()
    token_loss[~mask] = 1e6  # off-mask values must be ignored
    got = aggregate_token_loss(token_loss, mask, mode, *globals_).item()
    assert got == pytest.approx(np_aggregate(token_loss.numpy(), mask.numpy(), mode, *globals_), rel=1e-12)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_sequence_form_matches_token_form(mode):
    token_loss, mask = make_batch(seed=1)
    seq_loss = torch.where(mask, token_loss, 0.0).sum(-1)
    for globals_ in ((None, None), (123, 17)):
        token = aggregate_token_loss(token_loss, mask, mode, *globals_)
        seq = aggregate_sequence_loss(seq_loss, mask.sum(-1), mode, *globals_)
        torch.testing.assert_close(seq, token, rtol=1e-13, atol=1e-15)


def test_mask_may_be_zero_one_floats():
    token_loss, mask = make_batch(seed=2)
    torch.testing.assert_close(aggregate_token_loss(token_loss, mask.double()), aggregate_token_loss(token_loss, mask))


def test_empty_batch_gives_zero_not_nan():
    loss = aggregate_token_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), "seq-mean-token-mean")
    assert loss.item() == 0.0


def _vespo_grad_over_split(logprobs, old, adv, mask, mode, splits):
    """Sum of the gradients of each micro-batch's aggregated loss, with the global normalisers."""
    n_tok, n_seq = int(mask.sum()), int(mask.any(-1).sum())
    leaf = logprobs.detach().clone().requires_grad_(True)
    loss_fn = get_policy_loss("vespo")
    parts = torch.tensor_split(torch.arange(len(adv)), splits)
    for rows in parts:
        inputs = PolicyLossInputs(logprobs=leaf[rows], old_logprobs=old[rows], advantages=adv[rows],
                                  response_mask=mask[rows])
        out = loss_fn(inputs)
        aggregate_token_loss(out.token_loss, inputs.response_mask, mode, n_tok, n_seq, len(parts)).backward()
    return leaf.grad


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_gradient_independent_of_micro_batch_split(mode):
    _, mask = make_batch(seed=3)
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    logprobs = old + 0.1 * torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(mask.shape[0], generator=gen, dtype=torch.float64)
    whole = _vespo_grad_over_split(logprobs, old, adv, mask, mode, 1)
    for splits in (2, 4, [1, 6]):
        torch.testing.assert_close(_vespo_grad_over_split(logprobs, old, adv, mask, mode, splits), whole,
                                   rtol=1e-12, atol=1e-15)


def test_micro_token_mean_depends_on_the_split():
    # Per-micro-batch normalisation reweights tokens by their micro-batch's size: the split matters.
    _, mask = make_batch(seed=4)
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    logprobs = old + 0.1 * torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(mask.shape[0], generator=gen, dtype=torch.float64)
    whole = _vespo_grad_over_split(logprobs, old, adv, mask, "micro-token-mean", 1)
    split = _vespo_grad_over_split(logprobs, old, adv, mask, "micro-token-mean", 4)
    assert not torch.allclose(whole, split)


def test_micro_token_mean_is_the_mean_over_micro_batches_of_their_token_means():
    # What Megatron computes for a per-micro-batch mean loss: (1/M) sum_m (sum of l in m / tokens in m).
    token_loss, mask = make_batch(seed=5, batch=8)
    parts = [[0, 1], [2, 3, 4], [5], [6, 7]]
    loss_np, mask_np = token_loss.numpy(), mask.numpy()
    expected = np.mean([np.where(mask_np[p], loss_np[p], 0).sum() / mask_np[p].sum() for p in parts])
    got = sum(aggregate_token_loss(token_loss[p], mask[p], "micro-token-mean", global_num_micro_batches=len(parts))
              for p in parts)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_each_loss_defaults_to_its_reference_aggregation():
    from vespo_megatron.config import load_config

    expected = {"vespo": "micro-token-mean", "grpo": "seq-mean-token-mean", "gspo": "seq-mean-token-mean",
                "sapo": "seq-mean-token-mean", "cispo": "token-mean"}
    for name, mode in expected.items():
        assert load_config(None, [f"loss.name={name}"]).loss.aggregation_mode == mode
        for chosen in AGGREGATION_MODES:
            assert load_config(None, [f"loss.name={name}", f"loss.aggregation={chosen}"]).loss.aggregation_mode == chosen


def test_bad_arguments():
    token_loss, mask = make_batch()
    with pytest.raises(ValueError, match="mode='mean'.*token-mean"):
        aggregate_token_loss(token_loss, mask, "mean")
    with pytest.raises(ValueError, match="response_mask"):
        aggregate_token_loss(token_loss, mask[:, :-1])
    with pytest.raises(ValueError, match="global_num_tokens=-1"):
        aggregate_token_loss(token_loss, mask, "token-mean", global_num_tokens=-1)
    with pytest.raises(ValueError, match="seq_lengths"):
        aggregate_sequence_loss(torch.zeros(3), torch.zeros(4), "token-mean")

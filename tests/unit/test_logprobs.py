"""Chunked log-prob paths (single process) against the materialised-logits computation."""

import pytest
import torch

from vespo_megatron.loss.logprobs import vocab_parallel_token_logprobs
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.runtime.collectives import context_parallel_chunks

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def make_problem(s=7, b=3, h=5, vocab=11, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (s, b), generator=gen)
    return hidden, weight, targets


def naive_token_logprobs(hidden, weight, targets):
    logits = torch.einsum("sbh,vh->sbv", hidden, weight)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def naive_sequence_sums(hidden, weight, targets, segment_ids, num_sequences):
    logp = naive_token_logprobs(hidden, weight, targets)
    mask = segment_ids >= 0
    return logp.new_zeros(num_sequences).index_add(0, segment_ids[mask], logp[mask])


def grads(out, hidden, weight, coef):
    return torch.autograd.grad((out * coef).sum(), (hidden, weight))


def packed_segments(s, b, gen=None):
    """Row 0: prompt, seq 0, prompt, seq 1; row 1: seq 2 then padding; row 2: all prompt (-1)."""
    seg = torch.full((s, b), -1, dtype=torch.long)
    seg[1:3, 0] = 0
    seg[4:s, 0] = 1
    seg[0:s - 2, 1] = 2
    return seg, 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1000])
def test_token_path_matches_naive(dtype, chunk_size):
    hidden, weight, targets = make_problem(dtype=dtype)
    coef = torch.randn(targets.shape, dtype=dtype)
    out = vocab_parallel_token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    ref = naive_token_logprobs(hidden, weight, targets)
    torch.testing.assert_close(out, ref.to(out.dtype), **TOL[dtype])
    for got, want in zip(grads(out, hidden, weight, coef), grads(ref, hidden, weight, coef)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_sequence_path_matches_naive_on_packed_batch(dtype, chunk_size):
    hidden, weight, targets = make_problem(dtype=dtype, seed=1)
    seg, num = packed_segments(*targets.shape)
    coef = torch.randn(num, dtype=dtype)
    sums, extras = sequence_logprob_sums(hidden, weight, targets, seg, num, chunk_size=chunk_size)
    ref = naive_sequence_sums(hidden, weight, targets, seg, num)
    assert extras.shape == (0, num)
    torch.testing.assert_close(sums, ref.to(sums.dtype), **TOL[dtype])
    for got, want in zip(grads(sums, hidden, weight, coef), grads(ref, hidden, weight, coef)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_plain_batch_sequence_sums_equal_token_path_sums():
    hidden, weight, targets = make_problem(s=9, b=4, seed=2)
    seg = torch.arange(4).expand(9, 4).clone()
    seg[:3] = -1  # prompt
    sums, _ = sequence_logprob_sums(hidden, weight, targets, seg, 4, chunk_size=5)
    per_token = vocab_parallel_token_logprobs(hidden, weight, targets, chunk_size=7)
    torch.testing.assert_close(sums, per_token[3:].sum(0))
    coef = torch.randn(4, dtype=torch.float64)
    g_seq = grads(sums, hidden, weight, coef)
    g_tok = grads(per_token[3:].sum(0), hidden, weight, coef)
    for got, want in zip(g_seq, g_tok):
        torch.testing.assert_close(got, want)


def test_all_prompt_tokens_give_zero_sums_and_zero_grads():
    hidden, weight, targets = make_problem()
    seg = torch.full(targets.shape, -1, dtype=torch.long)
    sums, _ = sequence_logprob_sums(hidden, weight, targets, seg, 2, chunk_size=4)
    assert torch.equal(sums, torch.zeros(2, dtype=torch.float64))
    g_hidden, g_weight = grads(sums, hidden, weight, torch.ones(2, dtype=torch.float64))
    assert not g_hidden.any() and not g_weight.any()


def test_empty_sequence_dimension():
    hidden, weight, targets = make_problem(s=0)
    seg = torch.zeros(0, 3, dtype=torch.long)
    sums, _ = sequence_logprob_sums(hidden, weight, targets, seg, 3)
    sums.sum().backward()
    assert hidden.grad.shape == hidden.shape and not weight.grad.any()


def test_extras_are_passed_through_and_not_differentiable():
    hidden, weight, targets = make_problem()
    seg = torch.zeros(targets.shape, dtype=torch.long)
    extras = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    sums, out = sequence_logprob_sums(hidden, weight, targets, seg, 2, extra_partials=extras)
    torch.testing.assert_close(out, extras)
    assert not out.requires_grad and sums.requires_grad


def test_bf16_inputs_keep_fp32_statistics():
    hidden, weight, targets = make_problem(s=16, b=2, h=32, vocab=64, dtype=torch.bfloat16)
    out = vocab_parallel_token_logprobs(hidden, weight, targets, chunk_size=5)
    assert out.dtype == torch.float32
    ref = naive_token_logprobs(hidden.float(), weight.float(), targets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_forward_under_no_grad():
    hidden, weight, targets = make_problem()
    seg = torch.zeros(targets.shape, dtype=torch.long)
    with torch.no_grad():
        sums, _ = sequence_logprob_sums(hidden, weight, targets, seg, 1, chunk_size=2)
    assert not sums.requires_grad
    torch.testing.assert_close(sums, naive_sequence_sums(hidden, weight, targets, seg, 1).detach())


def test_context_parallel_chunks_is_load_balanced():
    x = torch.arange(16).reshape(1, 16)
    assert context_parallel_chunks(x, 2, 0, 1).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert context_parallel_chunks(x, 2, 1, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert context_parallel_chunks(x, 1, 0, 1) is x
    parts = [context_parallel_chunks(x, 4, r, 1) for r in range(4)]
    assert sorted(torch.cat(parts, 1).flatten().tolist()) == list(range(16))
    with pytest.raises(ValueError, match="2\\*cp="):
        context_parallel_chunks(torch.arange(6)[None], 2, 0, 1)
    with pytest.raises(ValueError, match="cp_rank"):
        context_parallel_chunks(x, 2, 2, 1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(segment_ids=torch.full((7, 3), 5)), "segment_ids"),
        (dict(segment_ids=torch.full((7, 3), -2)), "segment_ids"),
        (dict(segment_ids=torch.zeros(7, 2, dtype=torch.long)), "segment_ids"),
        (dict(targets=torch.zeros(6, 3, dtype=torch.long)), "targets"),
        (dict(targets=torch.full((7, 3), 11)), "targets"),
        (dict(weight=torch.zeros(11, 4, dtype=torch.float64)), "weight"),
        (dict(hidden=torch.zeros(7, 3, dtype=torch.float64)), "hidden"),
        (dict(extra_partials=torch.zeros(2, 3)), "extra_partials"),
        (dict(num_sequences=-1), "num_sequences"),
        (dict(vocab_start=-1), "vocab_start"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    hidden, weight, targets = make_problem()
    kwargs = dict(hidden=hidden, weight=weight, targets=targets, segment_ids=torch.zeros(7, 3, dtype=torch.long),
                  num_sequences=2, chunk_size=4)
    kwargs.update(change)
    if "segment_ids" in change and change["segment_ids"].dtype != torch.long:
        kwargs["segment_ids"] = change["segment_ids"].long()
    with pytest.raises(ValueError, match=match):
        sequence_logprob_sums(**kwargs)


def test_token_path_bad_input():
    hidden, weight, targets = make_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_token_logprobs(hidden, weight, targets - 1)

"""Pure pieces of generation: inverse-CDF sampling, the uniforms table, stop rules, prompt checks, and
replay of partially recorded routing (slots the sampler never routed). No process group, no model."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.models.routing import RoutingMode, _LayerRouting, index_dtype, unrouted
from vespo_megatron.rollout.common import check_prompts, draw_uniforms, hits_stop
from vespo_megatron.rollout.sampling import inverse_cdf_sample, sample_next_tokens

# ------------------------------------------------------------------------------------------ sampling


def _reference_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> list[int]:
    """Smallest t with u * total < sum_{j<=t} p_j, in float64 Python arithmetic."""
    out = []
    for row, u in zip(probs.double().tolist(), uniforms.double().tolist()):
        target, acc = u * sum(row), 0.0
        for token, p in enumerate(row):
            acc += p
            if target < acc:
                out.append(token)
                break
        else:
            out.append(len(row) - 1)
    return out


def test_inverse_cdf_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 17, generator=gen), dim=-1)
    uniforms = torch.rand(200, generator=gen)
    assert inverse_cdf_sample(probs, uniforms).tolist() == _reference_inverse_cdf(probs, uniforms)


def test_inverse_cdf_never_picks_zero_probability_tokens_and_follows_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # evenly spaced uniforms, incl. near 0 and 1
    tokens = inverse_cdf_sample(probs.expand(1000, -1), grid.float())
    counts = torch.bincount(tokens, minlength=6)
    assert counts.tolist() == [0, 500, 0, 250, 250, 0]
    edge = inverse_cdf_sample(probs.expand(2, -1), torch.tensor([0.0, 1.0 - 1e-7]))
    assert edge.tolist() == [1, 4]


def test_sampling_with_uniforms_filters_and_records_the_untruncated_logprob():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 12, generator=gen)
    uniforms = torch.rand(64, generator=gen)
    tokens, logprobs = sample_next_tokens(logits, temperature=0.7, top_k=4, top_p=0.9, uniforms=uniforms)
    top4 = torch.topk(logits, 4, dim=-1).indices
    assert bool((top4 == tokens.unsqueeze(1)).any(dim=1).all())
    expected = torch.log_softmax(logits.double() / 0.7, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, rtol=0, atol=1e-6)


def test_a_rows_sample_does_not_depend_on_the_other_rows_of_the_batch():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 30, generator=gen)
    uniforms = torch.rand(10, generator=gen)
    full, _ = sample_next_tokens(logits, temperature=1.3, top_p=0.8, uniforms=uniforms)
    keep = torch.tensor([7, 2, 5])
    subset, _ = sample_next_tokens(logits[keep], temperature=1.3, top_p=0.8, uniforms=uniforms[keep])
    assert subset.tolist() == full[keep].tolist()


def test_uniforms_table_is_per_response_position_and_seeded():
    a = draw_uniforms(torch.Generator().manual_seed(9), 5, 3)
    b = draw_uniforms(torch.Generator().manual_seed(9), 5, 3)
    assert a.shape == (5, 3) and torch.equal(a, b)
    assert bool(((a >= 0) & (a < 1)).all())


# ------------------------------------------------------------------------------- stops and checks


def test_stop_rules():
    assert hits_stop([4, 5, 1], eos_id=1)
    assert not hits_stop([4, 1, 5], eos_id=1)
    assert hits_stop([4, 7, 8], eos_id=1, stop_sequences=((7, 8),))
    assert not hits_stop([7, 8, 9], eos_id=1, stop_sequences=((7, 8),))
    assert not hits_stop([8], eos_id=1, stop_sequences=((7, 8),))
    assert not hits_stop([], eos_id=1, stop_sequences=((7, 8),))


@pytest.mark.parametrize("prompts, budget, message", [
    ([[3], []], 4, "prompt 1 is empty"),
    ([list(range(17))], 1, "a prompt of 17 tokens leaves no room in the context of 17 tokens"),
    ([list(range(10))], 8, "a prompt of 10 tokens plus rollout.max_new_tokens=8 exceeds the context of 17 tokens"),
])  # fmt: skip
def test_bad_prompts_fail_with_the_numbers_and_the_fix(prompts, budget, message):
    with pytest.raises(ValueError, match=message):
        check_prompts(prompts, budget, seq_length=16)


def test_prompts_that_fit_exactly_pass():
    assert check_prompts([list(range(10)), [1]], 7, seq_length=16).tolist() == [10, 1]


# ------------------------------------------------------------------- replay of partial recordings


def test_index_dtype_leaves_room_for_the_unrouted_mark():
    assert index_dtype(255) == torch.uint8 and unrouted(torch.uint8) == 255
    assert index_dtype(256) == torch.int16 and unrouted(torch.int16) == 32767


def test_unrouted_slots_take_the_routers_own_choice_and_are_not_counted():
    recorder = SimpleNamespace(mode=RoutingMode.REPLAY, counting=True, measuring=True, dtype=torch.uint8)
    slot = _LayerRouting(recorder, layer_number=1)
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.2, 0.3], [0.1, 0.1, 0.1, 0.7]])
    mark = unrouted(torch.uint8)
    target = torch.tensor([[0, 3], [mark, mark], [3, 2]], dtype=torch.uint8)  # row 0 differs from free top-2
    slot.targets = deque([target])

    def free_topk(s, k, num_groups=None, group_topk=None):
        return torch.topk(s, k, dim=1)

    values, indices = slot.get_replay_topk(scores, 2, default_compute_topk=free_topk)
    assert indices[0].tolist() == [0, 3]
    assert sorted(indices[1].tolist()) == [0, 3]  # free top-2 of row 1
    assert indices[2].tolist() == [3, 2]
    torch.testing.assert_close(values, scores.gather(1, indices))
    # Two recorded rows, one of which the free router would route elsewhere (row 2's free set is {3, x}:
    # scores 0.1 tie, so compare as sets only where unambiguous).
    free = free_topk(scores, 2)[1]
    moved = int((free[[0, 2]].sort(1).values != indices[[0, 2]].sort(1).values).any(1).sum())
    assert slot.mismatch.tolist() == [float(moved), 2.0]
    assert slot.changed.tolist() == [float(moved), 2.0]

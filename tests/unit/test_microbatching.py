"""Token-budget bins, packed rows and their row layout (pure: no process group)."""

from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.rl.batch import Rollout, input_positions, micro_batches, row_layout
from vespo_megatron.train.batches import packed_lm_batch
from vespo_megatron.train.microbatching import SequenceTooLongError, assign_bins, check_lengths, plan_micro_batches

LENGTHS = [12, 11, 10, 8, 7, 6, 5, 5, 0]
CTX = SimpleNamespace(cp=1, cp_rank=0, tp=1, sequence_parallel=False, dp_group=None)


def _cost(members, pack):
    lengths = [LENGTHS[i] for i in members]
    return sum(lengths) if pack else len(lengths) * max(lengths, default=0)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("budget", [12, 16, 30, 100])
def test_bins_hold_every_sequence_once_within_the_budget(pack, budget):
    bins = assign_bins(LENGTHS, budget, pack)
    assert sorted(i for members in bins for i in members) == list(range(len(LENGTHS)))
    assert all(_cost(members, pack) <= budget for members in bins)


def test_packed_bins_are_balanced_and_few():
    bins = assign_bins(LENGTHS, 32, pack=True)
    loads = [_cost(members, True) for members in bins]
    assert len(bins) == 2 and max(loads) - min(loads) <= 2  # 64 positions in two bins of 32 and 32
    assert len(assign_bins(LENGTHS, 100, pack=True)) == 1


def test_padded_bins_group_similar_lengths():
    bins = assign_bins(LENGTHS, 24, pack=False)
    for members in bins:  # consecutive in length order: no short sequence padded to a long one
        lengths = [LENGTHS[i] for i in members]
        assert lengths == sorted(lengths, reverse=True)
    assert [LENGTHS[i] for i in bins[0]] == [12, 11]


@pytest.mark.parametrize("pack", [True, False])
def test_more_bins_on_request_none_empty(pack):
    bins = assign_bins(LENGTHS, 100, pack, min_bins=4)
    assert len(bins) == 4 and all(bins)


def test_plan_without_data_parallel_group_is_the_local_plan():
    local = len(assign_bins(LENGTHS, 16, True))
    assert plan_micro_batches(LENGTHS, 16, True, None) == assign_bins(LENGTHS, 16, True, min_bins=local)


def test_a_sequence_longer_than_the_budget_names_both_numbers():
    with pytest.raises(SequenceTooLongError, match=r"rollout row 7 needs 12 token positions.*"
                                                   r"max_tokens_per_microbatch=10.*>= 12"):
        check_lengths([4, 12], 10, [3, 7])
    with pytest.raises(SequenceTooLongError):
        assign_bins([4, 12], 10, pack=True)


def _rollout():
    sequences = torch.arange(1, 1 + 3 * 9).view(3, 9)
    return Rollout(sequences=sequences, prompt_lengths=torch.tensor([2, 3, 1]),
                   response_lengths=torch.tensor([3, 0, 4]), sampler_logprobs=-torch.rand(3, 9),
                   rewards=torch.zeros(3), advantages=torch.tensor([1.0, -1.0, 0.5]))


def test_packed_row_restarts_positions_and_skips_empty_responses():
    rollout = _rollout()
    assert input_positions(rollout).tolist() == [4, 0, 4]  # prompt + response - 1; no response: nothing
    (batch,) = micro_batches(rollout, torch.arange(3), 1, CTX, max_tokens=8, pack=True)
    seqs = rollout.sequences
    assert batch["tokens"].tolist() == [seqs[0, :4].tolist() + seqs[2, :4].tolist()]
    assert batch["labels"].tolist() == [seqs[0, 1:5].tolist() + seqs[2, 1:5].tolist()]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]  # index in the batch: rows 0, 2
    assert batch["cu_seqlens"].tolist() == [0, 4, 8] and batch["max_seqlen"] == 4
    # labels 1..3 of row 0 (response at sequence positions 2..4) and 0..3 of row 2 (positions 1..4)
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1]]
    assert batch["rows"].tolist() == [0, 2, 1] and batch["sampler_logprobs"].shape == (3, 4)


def test_packed_row_pads_to_the_alignment_in_a_segment_of_its_own():
    rows = torch.arange(10).view(2, 5)
    batch = packed_lm_batch(rows, torch.ones_like(rows), [3, 2], align=4)
    assert batch["tokens"].shape == (1, 8) and batch["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert batch["loss_mask"][0, 5:].sum() == 0


def test_plan_rounds_the_count_up_to_a_multiple_and_may_leave_bins_empty():
    """The interleaved pipeline schedule runs a multiple of pp micro-batches."""
    assert len(assign_bins(LENGTHS, 16, True)) % 4  # the local plan alone is not a multiple of 4
    bins = plan_micro_batches(LENGTHS, 16, True, None, multiple_of=4)
    assert len(bins) % 4 == 0 and sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))
    few = plan_micro_batches([3, 2, 2], 64, True, None, multiple_of=4)
    assert len(few) == 4 and sorted(map(len, few)) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="multiple_of=0"):
        plan_micro_batches([3], 8, True, None, multiple_of=0)


def test_packed_rows_under_the_interleaved_schedule_all_have_the_budgets_width():
    rollout = _rollout()
    ctx = SimpleNamespace(**{**vars(CTX), "pp": 2})
    batches = micro_batches(rollout, torch.arange(3), 1, ctx, max_tokens=10, pack=True, fixed_width=True)
    # One bin would hold both 4-position sequences; the schedule needs a multiple of pp = 2, so they spread.
    assert len(batches) == 2
    assert [b["tokens"].shape for b in batches] == [(1, 10), (1, 10)]
    assert [b["cu_seqlens"].tolist() for b in batches] == [[0, 4, 10], [0, 4, 10]]
    assert sum(int(b["loss_mask"].sum()) for b in batches) == 3 + 4
    assert sorted(int(r) for b in batches for r in b["rows"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="width 6 cannot hold 8"):
        packed_lm_batch(rollout.sequences[[0, 2]], torch.ones_like(rollout.sequences[[0, 2]]), [4, 4], width=6)


def test_row_layout_puts_packed_values_back_per_sequence():
    rollout = _rollout()
    (batch,) = micro_batches(rollout, torch.arange(3), 1, CTX, max_tokens=8, pack=True)
    values = torch.arange(8.0).unsqueeze(0)
    rows = row_layout(batch, values)  # [b, w] in the batch's sequence order (rows 0, 2, 1)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 0, 0, 0]]
    padded = micro_batches(rollout, torch.arange(3), 1, CTX, max_tokens=8)
    assert [b["tokens"].shape for b in padded] == [(2, 4), (1, 1)]  # trimmed to each bin's longest row
    assert row_layout(padded[0], values) is values

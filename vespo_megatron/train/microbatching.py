"""Token-budget micro-batches: which sequences of a mini-batch go into which micro-batch.

Sequences stay whole and on the data-parallel rank that holds them. :func:`assign_bins` is the pure
bin-packing for one rank; :func:`plan_micro_batches` makes the data-parallel ranks agree on one number of
micro-batches (the schedule, MoE all-to-alls and the gradient reduction need every rank to run the same
count) and re-bins every rank's sequences into that many.

Cost of a micro-batch, the quantity held under the budget ``T``:

* packed (``pack=True``): the sum of its sequences' lengths (one row, no padding);
* padded (``pack=False``): its sequence count times its longest length (each row padded to the longest).

Packed bins start as many as the tokens need (``ceil(sum / T)``) and are filled longest-first into the
least-filled bin that still fits, opening a bin when none does (balanced bins); padded bins
take the sequences in order of decreasing length, consecutively, so that a micro-batch holds sequences of
similar length, then the fullest bins are split until the agreed count is reached.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist

from vespo_megatron.runtime.collectives import max_over


class SequenceTooLongError(ValueError):
    """A sequence needs more positions than the token budget of a micro-batch."""


def check_lengths(lengths: Sequence[int], budget: int, names: Sequence[int]) -> None:
    """Raise :class:`SequenceTooLongError` naming the first sequence (by ``names``) longer than ``budget``."""
    for length, name in zip(lengths, names):
        if length > budget:
            raise SequenceTooLongError(
                f"rollout row {name} needs {length} token positions (prompt + response - 1), more than "
                f"train.max_tokens_per_microbatch={budget}; raise the budget to >= {max(lengths)} or shorten "
                "rollout.max_new_tokens (sequences are never truncated)")


def _packed_bins(lengths: Sequence[int], budget: int, min_bins: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    start = max(min_bins, -(-sum(lengths) // budget))  # no fewer bins than the tokens need
    bins: list[list[int]] = [[] for _ in range(start)]
    loads = [0] * start
    for index in order:
        fitting = [b for b in range(len(bins)) if loads[b] + lengths[index] <= budget]
        if fitting:
            target = min(fitting, key=lambda b: (loads[b], len(bins[b]), b))
        else:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(index)
        loads[target] += lengths[index]
    return bins


def _padded_cost(members: Sequence[int], lengths: Sequence[int]) -> int:
    return len(members) * max((lengths[i] for i in members), default=0)


def _padded_bins(lengths: Sequence[int], budget: int, min_bins: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for index in order:
        if bins and _padded_cost(bins[-1] + [index], lengths) <= budget:
            bins[-1].append(index)
        else:
            bins.append([index])
    while len(bins) < min_bins:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            bins.append([])
            continue
        widest = max(splittable, key=lambda b: (_padded_cost(bins[b], lengths), -b))
        members = bins[widest]
        bins[widest:widest + 1] = [members[: len(members) // 2], members[len(members) // 2:]]
    return bins


def assign_bins(lengths: Sequence[int], budget: int, pack: bool, min_bins: int = 1) -> list[list[int]]:
    """Indices of ``lengths`` per micro-batch: at least ``min_bins`` bins, each within ``budget``.

    Every length must be ``<= budget`` (:func:`check_lengths`). Bins may be empty when there are fewer
    sequences than ``min_bins``; the indices in a bin are in decreasing length order.
    """
    if budget < 1 or min_bins < 1:
        raise ValueError(f"budget={budget} and min_bins={min_bins} must be >= 1")
    if any(length > budget for length in lengths):
        raise SequenceTooLongError(f"a sequence of {max(lengths)} positions exceeds the budget {budget}")
    return (_packed_bins if pack else _padded_bins)(lengths, budget, min_bins)


def plan_micro_batches(lengths: Sequence[int], budget: int, pack: bool,
                       dp_group: Optional[dist.ProcessGroup], multiple_of: int = 1) -> list[list[int]]:
    """:func:`assign_bins` with the same number of bins on every rank of ``dp_group`` (a collective there).

    The count is the smallest multiple of ``multiple_of`` that every rank fits its sequences into (the
    interleaved pipeline schedule runs a multiple of the pipeline size). With ``multiple_of = 1`` none of the
    bins is empty, since the count never exceeds the sequences of the rank that needs the most bins and every
    rank holds as many sequences; rounding up to a multiple may leave bins empty when there are fewer sequences
    than bins. Each round is one max all-reduce; the count only grows, so it ends after a few rounds.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of} must be >= 1")
    count = multiple_of
    while True:
        bins = assign_bins(lengths, budget, pack, count)
        agreed = -(-int(max_over([len(bins)], dp_group)[0]) // multiple_of) * multiple_of
        if agreed == count:
            return bins
        count = agreed

"""Exact per-sequence log-prob sums with one ``[k, num_sequences]`` all-reduce.

VESPO depends on a sequence only through ``S_seq = sum_t log pi(y_t)`` (and the detached behaviour
sums), see docs/loss.md. :func:`sequence_logprob_sums` gives every rank of ``seq_group`` (the TP x CP
ranks that share a sequence) the exact ``S_seq`` while no rank ever sees another rank's per-token
log-probs:

* target logits: each TP rank sums the targets that fall in its vocabulary shard, per sequence;
* logsumexp: per token it needs the TP ranks' shard logsumexps; one all-to-all hands each TP rank the
  values for its ``1/TP`` slice of the tokens, which it finishes and adds per sequence;
* one all-reduce over ``seq_group`` of ``[partials; extra rows]`` completes the sums (extra rows, e.g.
  the behaviour log-prob sums or token counts, ride along for free).

Backward gets ``dL/dS_seq``, already identical on every rank because every rank computed the same loss
from the same all-reduced sums, so it is *not* reduced again. Each rank all-gathers the finished
logsumexp slices (its only backward collective) and recomputes its logits chunk by chunk. The whole
thing is one autograd function because composing a generic all-reduce with autograd would count the
gradient once per rank of the group. docs/sequence_parallel_loss.md has the communication accounting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vespo_megatron.loss.logprobs import (
    DEFAULT_CHUNK_SIZE,
    check_logprob_inputs,
    check_targets_in_vocab,
    shard_grads,
    chunked_token_stats,
    compute_dtype,
    exchange_token_stats,
    gather_token_slices,
    group_rank,
    group_size,
    padded_slice_len,
)


def sequence_partials(target_logit, lse_slice, segments, slice_start, num_sequences):
    """This rank's ``[num_sequences]`` partial: all its target logits minus its slice's logsumexps."""
    partial = target_logit.new_zeros(num_sequences)
    partial.index_add_(0, segments, target_logit)
    slice_segments = segments[slice_start:slice_start + lse_slice.numel()]
    partial.index_add_(0, slice_segments, -lse_slice[: slice_segments.numel()])
    return partial


class _SequenceLogprobSums(torch.autograd.Function):
    """Forward: chunked statistics, TP all-to-all, one ``[k, B]`` all-reduce over ``seq_group``.
    Backward: TP all-gather of the finished logsumexps, chunked recompute, nothing else."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, extras, num_sequences, vocab_start, tp_group,
                seq_group, chunk_size):
        s, b, h = hidden.shape
        weight_c = weight.to(compute_dtype(weight.dtype))
        hidden_flat, targets_flat = hidden.reshape(s * b, h), targets.reshape(s * b)
        rows = (segment_ids.reshape(s * b) >= 0).nonzero().squeeze(1)
        segments = segment_ids.reshape(s * b).index_select(0, rows)
        lse_local, target_logit = chunked_token_stats(
            hidden_flat, weight_c, targets_flat, rows, vocab_start=vocab_start, chunk_size=chunk_size
        )
        tp = group_size(tp_group)
        if tp == 1:
            lse_slice, slice_start = lse_local, 0
        else:
            recv = exchange_token_stats(lse_local[None], tp_group)
            lse_slice = torch.logsumexp(recv[:, 0], dim=0)
            slice_start = group_rank(tp_group) * padded_slice_len(rows.numel(), tp)
        partial = sequence_partials(target_logit, lse_slice, segments, slice_start, num_sequences)
        packed = torch.cat([partial[None], extras.to(partial.dtype)])
        if group_size(seq_group) > 1:
            dist.all_reduce(packed, group=seq_group)
        ctx.save_for_backward(hidden, weight, targets, rows, segments, lse_slice)
        ctx.vocab_start, ctx.tp_group, ctx.chunk_size = vocab_start, tp_group, chunk_size
        extras_reduced = packed[1:].clone()
        ctx.mark_non_differentiable(extras_reduced)
        return packed[0].clone(), extras_reduced

    @staticmethod
    def backward(ctx, grad_sums, _grad_extras):
        hidden, weight, targets, rows, segments, lse_slice = ctx.saved_tensors
        if group_size(ctx.tp_group) == 1:
            lse_full = lse_slice
        else:
            lse_full = gather_token_slices(lse_slice[None], rows.numel(), ctx.tp_group)[0]
        # dL/dS_seq is already the same on every rank: no all-reduce here (see module docstring).
        coef = grad_sums.to(compute_dtype(weight.dtype)).index_select(0, segments)
        grad_hidden, grad_weight = shard_grads(ctx, hidden, weight, targets, rows, lse_full, coef)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def sequence_logprob_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_sequences: int,
    *,
    vocab_start: int = 0,
    tp_group=None,
    seq_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``S_seq = sum_t log pi(y_t)`` per sequence on every rank of ``seq_group``.

    Args:
        hidden: ``[s, b, h]`` final hidden states of the tokens this rank holds (after the sequence-
            parallel gather; the same on every rank of ``tp_group``).
        weight: ``[V/TP, h]`` output-layer shard, rows ``vocab_start .. vocab_start + V/TP``.
        targets: ``[s, b]`` full-vocabulary ids (only response tokens are read).
        segment_ids: ``[s, b]`` long, the sequence index in ``[0, num_sequences)`` of each response
            token, ``-1`` for prompt and padding tokens. A plain batch uses the batch row; a packed
            batch numbers the sequences of each row.
        num_sequences: length of the result.
        vocab_start: first full-vocabulary row of ``weight``.
        tp_group: the vocabulary-sharing group; ``None`` for no tensor parallelism.
        seq_group: every rank holding tokens of these sequences (TP x CP); ``None`` for a single rank.
        chunk_size: tokens whose logits are materialised at once.
        extra_partials: optional ``[k-1, num_sequences]`` (or ``[num_sequences]``) per-rank partial sums
            reduced in the same all-reduce, e.g. behaviour log-prob sums or response-token counts.
            Each rank passes the partial of the tokens it is responsible for; if TP ranks hold the
            same tokens, only one of them (or each with a ``1/TP`` share) should contribute.

    Returns:
        ``(logprob_sums, extras_reduced)``: ``[num_sequences]`` (fp32, fp64 for fp64 inputs) carrying
        the gradient to ``hidden`` (this TP rank's partial) and ``weight``; ``[k-1, num_sequences]``
        reduced extras, no gradient. Every rank of ``seq_group`` must call this, even with no response
        tokens (it then contributes zeros).
    """
    check_logprob_inputs(hidden, weight, targets, vocab_start=vocab_start, chunk_size=chunk_size)
    if tuple(segment_ids.shape) != tuple(targets.shape):
        raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [s, b]={tuple(targets.shape)}")
    if segment_ids.dtype != torch.int64:
        raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected torch.long")
    if not isinstance(num_sequences, int) or num_sequences < 0:
        raise ValueError(f"num_sequences={num_sequences!r} must be an int >= 0")
    if segment_ids.numel() and (int(segment_ids.min()) < -1 or int(segment_ids.max()) >= num_sequences):
        raise ValueError(
            f"segment_ids must lie in [-1, num_sequences={num_sequences}) (got min {int(segment_ids.min())}, "
            f"max {int(segment_ids.max())}); -1 marks prompt/padding tokens"
        )
    tp = group_size(tp_group)
    if tp > 1 and group_size(seq_group) % tp:
        raise ValueError(
            f"seq_group has {group_size(seq_group)} ranks but tp_group has {tp}; seq_group must contain the "
            "TP group (pass the TP x CP group)"
        )
    check_targets_in_vocab(targets[segment_ids >= 0], weight.shape[0] * tp, what="targets of response tokens")
    cdtype = compute_dtype(weight.dtype)
    if extra_partials is None:
        extras = torch.zeros(0, num_sequences, dtype=cdtype, device=hidden.device)
    else:
        extras = extra_partials.detach()
        extras = extras[None] if extras.dim() == 1 else extras
        if extras.dim() != 2 or extras.shape[1] != num_sequences:
            raise ValueError(
                f"extra_partials has shape {tuple(extra_partials.shape)}; expected [k, num_sequences={num_sequences}]"
            )
    return _SequenceLogprobSums.apply(
        hidden, weight, targets, segment_ids, extras, num_sequences, vocab_start, tp_group, seq_group, chunk_size
    )

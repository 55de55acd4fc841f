"""Chunked, vocabulary-parallel log-prob statistics from final hidden states and the output-layer shard.

The logits ``z_t = W h_t`` are the largest tensor of the loss (``tokens x V/TP`` floats). Nothing here
ever holds them for more than ``chunk_size`` tokens at a time: the forward keeps per-token statistics
only (this shard's logsumexp and the target logit when the target falls in this shard), and the
backward recomputes each chunk's logits, turns them into ``coef_t * (onehot(y_t) - softmax_t)`` in
place and multiplies them out into the hidden and weight gradients. Peak memory is
``O(chunk_size x V/TP)``.

This module holds the arithmetic (static helpers, no process group in sight), the two tensor-parallel
logsumexp exchanges, and the per-token path :func:`vocab_parallel_token_logprobs` that the token-level
baselines (GRPO, SAPO, CISPO) and metrics use. The per-sequence path that VESPO uses, with its single
``[k, num_sequences]`` all-reduce, lives in :mod:`vespo_megatron.loss.sequence`. The design and the
communication accounting are in docs/sequence_parallel_loss.md.

Layout follows Megatron: tokens are ``[s, b]``, hidden states ``[s, b, h]``; the weight shard is
``[V/TP, h]`` holding rows ``vocab_start .. vocab_start + V/TP`` of the full vocabulary. Every rank of
``tp_group`` must hold the same tokens (Megatron gathers sequence-parallel activations before the
output layer); ``tp_group=None`` means no tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_SIZE = 1024


# ----------------------------------------------------------------------------------------- groups
def group_size(group) -> int:
    """Ranks in ``group``; ``None`` stands for "not sharded" (one rank), not for the world group."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ------------------------------------------------------------------------------------- validation
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in fp32 for bf16/fp16/fp32 inputs, in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logprob_inputs(hidden, weight, targets, *, vocab_start, chunk_size) -> None:
    """Raise ValueError naming the argument when the shapes or scalars do not fit together."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (tokens per logits chunk)")
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start!r} must be an int >= 0 (first vocab row of this shard)")
    if hidden.dim() != 3:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected [s, b, h]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected [V/TP, h] with h={hidden.shape[2]} from hidden"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight holds no vocabulary rows; each TP rank needs a non-empty shard")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected [s, b]={tuple(hidden.shape[:2])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets has dtype {targets.dtype}; expected integer token ids (torch.long)")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype")


def check_targets_in_vocab(targets: torch.Tensor, vocab_size: int, what: str = "targets") -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"{what} holds ids outside [0, {vocab_size}) (min {int(targets.min())}, max {int(targets.max())}); "
            "the full vocabulary is V/TP x TP rows"
        )


# ------------------------------------------------------------------------------------ chunk math
def chunk_bounds(num_tokens: int, chunk_size: int):
    """``(start, end)`` of each chunk of ``chunk_size`` tokens; the last one may be shorter."""
    return [(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


def shard_logits(hidden_rows: torch.Tensor, weight_c: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``[n, V/TP]`` logits of this shard, written into the first ``n`` rows of ``buffer``.

    Reusing one chunk buffer avoids allocating (and page-faulting) a fresh chunk of logits per chunk.
    """
    out = buffer[: hidden_rows.shape[0]]
    return torch.mm(hidden_rows.to(weight_c.dtype), weight_c.t(), out=out)


def logits_buffer(weight_c: torch.Tensor, num_tokens: int, chunk_size: int) -> torch.Tensor:
    return weight_c.new_empty(min(chunk_size, max(num_tokens, 1)), weight_c.shape[0])


def local_targets(targets_rows: torch.Tensor, vocab_start: int, shard_size: int):
    """Target ids relative to this shard, and whether each target falls inside it."""
    rel = targets_rows.long() - vocab_start
    in_shard = (rel >= 0) & (rel < shard_size)
    return rel.clamp(0, shard_size - 1), in_shard


def shard_token_stats_(logits: torch.Tensor, rel_targets, in_shard):
    """Per-token logsumexp over this shard, and the target logit (0 when the target is elsewhere).

    Overwrites ``logits`` (with ``exp(z - max)``) to keep the chunk's memory to one buffer.
    """
    target_logit = logits.gather(1, rel_targets[:, None]).squeeze(1) * in_shard
    row_max = logits.amax(dim=1)
    lse = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
    return lse, target_logit


def chunked_token_stats(hidden_flat, weight_c, targets_flat, rows, *, vocab_start, chunk_size):
    """``(lse_local, target_logit)`` for the token rows ``rows`` of ``hidden_flat`` (``None`` = all)."""
    num = hidden_flat.shape[0] if rows is None else rows.numel()
    lse = torch.empty(num, dtype=weight_c.dtype, device=weight_c.device)
    target_logit = torch.empty_like(lse)
    buffer = logits_buffer(weight_c, num, chunk_size)
    for start, end in chunk_bounds(num, chunk_size):
        h_rows, t_rows = _take(hidden_flat, targets_flat, rows, start, end)
        rel, in_shard = local_targets(t_rows, vocab_start, weight_c.shape[0])
        logits = shard_logits(h_rows, weight_c, buffer)
        lse[start:end], target_logit[start:end] = shard_token_stats_(logits, rel, in_shard)
    return lse, target_logit


def chunked_grads(hidden_flat, weight_c, targets_flat, rows, lse_full, coef, *, vocab_start, chunk_size,
                  need_hidden: bool, need_weight: bool):
    """Recompute each chunk's softmax and return ``(grad_hidden_flat, grad_weight)`` (either may be None).

    With ``dz_t = coef_t * (onehot(y_t) - p_t)`` never formed:
    ``grad_h_t = coef_t * (W[y_t] - p_t @ W)`` and ``grad_W = sum_t coef_t (onehot(y_t) - p_t)^T h_t``,
    so the coefficient scales ``[n, h]`` rows instead of the ``[n, V/TP]`` chunk, and the chunk sees a
    single elementwise pass (the exp). ``grad_hidden_flat`` has the shape of ``hidden_flat`` (zero on rows
    outside ``rows``) and is this TP rank's partial; ``grad_weight`` covers this shard's rows.
    """
    num = hidden_flat.shape[0] if rows is None else rows.numel()
    grad_hidden = torch.zeros_like(hidden_flat) if need_hidden else None
    grad_weight = torch.zeros_like(weight_c) if need_weight else None
    weight_aug = lse_shifted_weight(weight_c)
    buffer = logits_buffer(weight_c, num, chunk_size)
    for start, end in chunk_bounds(num, chunk_size):
        h_rows, t_rows = _take(hidden_flat, targets_flat, rows, start, end)
        h_rows = h_rows.to(weight_c.dtype)
        rel, in_shard = local_targets(t_rows, vocab_start, weight_c.shape[0])
        softmax = shard_softmax_(h_rows, lse_full[start:end], weight_aug, buffer)
        c = coef[start:end, None]
        target_coef = c * in_shard[:, None]
        if need_hidden:
            dh = torch.mm(softmax, weight_c).mul_(-c).add_(weight_c.index_select(0, rel) * target_coef)
            if rows is None:
                grad_hidden[start:end] = dh
            else:
                grad_hidden.index_copy_(0, rows[start:end], dh.to(grad_hidden.dtype))
        if need_weight:
            grad_weight.addmm_(softmax.t(), h_rows * c, alpha=-1)
            grad_weight.index_add_(0, rel, h_rows * target_coef)
    return grad_hidden, grad_weight


def lse_shifted_weight(weight_c: torch.Tensor) -> torch.Tensor:
    """``[W, -1]``: with hidden rows ``[h_t, lse_t]`` one matmul yields ``z_t - lse_t`` directly."""
    return torch.cat([weight_c, weight_c.new_full((weight_c.shape[0], 1), -1.0)], dim=1)


def shard_softmax_(h_rows, lse_rows, weight_aug, buffer) -> torch.Tensor:
    """This shard's slice of the full softmax, ``exp(z - lse_full)``, written into ``buffer``."""
    h_aug = torch.cat([h_rows, lse_rows[:, None]], dim=1)
    return shard_logits(h_aug, weight_aug, buffer).exp_()


def shard_grads(ctx, hidden, weight, targets, rows, lse_full, coef):
    """An autograd backward's ``(grad_hidden [s, b, h], grad_weight)`` on this rank's vocabulary shard.

    ``coef`` is dL/d log pi per token (of ``rows``, or of every token when ``rows`` is None); ``ctx``
    carries ``vocab_start``, ``chunk_size`` and ``needs_input_grad`` of the calling Function.
    """
    s, b, h = hidden.shape
    weight_c = weight.to(compute_dtype(weight.dtype))
    grad_hidden, grad_weight = chunked_grads(
        hidden.reshape(s * b, h), weight_c, targets.reshape(s * b), rows, lse_full, coef.to(weight_c.dtype),
        vocab_start=ctx.vocab_start, chunk_size=ctx.chunk_size,
        need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
    )
    if grad_hidden is not None:
        grad_hidden = grad_hidden.reshape(s, b, h)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


def _take(hidden_flat, targets_flat, rows, start, end):
    if rows is None:
        return hidden_flat[start:end], targets_flat[start:end]
    idx = rows[start:end]
    return hidden_flat.index_select(0, idx), targets_flat.index_select(0, idx)


# ------------------------------------------------------------------ tensor-parallel lse exchanges
def padded_slice_len(num_tokens: int, tp: int) -> int:
    """Tokens per TP slice; at least one so every rank always takes part in the exchange."""
    return max(1, -(-num_tokens // tp))


def exchange_token_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """All-to-all ``[c, N]`` per-token statistics so each TP rank gets every rank's values for its slice.

    Returns ``[TP, c, m]`` with ``m = ceil(N / TP)``: entry ``[i]`` is rank ``i``'s statistics for the
    tokens ``rank*m .. rank*m + m`` (zero-padded past ``N``). Each rank sends ``(TP-1)/TP`` of its
    ``c x N`` floats, which is a reduce-scatter's worth of traffic.
    """
    tp = group_size(tp_group)
    channels, num = stats.shape
    m = padded_slice_len(num, tp)
    send = stats.new_zeros(channels, tp * m)
    send[:, :num] = stats
    send = send.view(channels, tp, m).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=tp_group)
    return recv


def gather_token_slices(slices: torch.Tensor, num_tokens: int, tp_group) -> torch.Tensor:
    """All-gather ``[c, m]`` finished per-token slices into ``[c, N]`` (padding dropped)."""
    tp = group_size(tp_group)
    channels, m = slices.shape
    out = slices.new_empty(tp * channels * m)
    _all_gather_single(out, slices.reshape(-1).contiguous(), tp_group)
    return out.view(tp, channels, m).transpose(0, 1).reshape(channels, tp * m)[:, :num_tokens]


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


# ------------------------------------------------------------------------------ per-token path
class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """Per-token ``log pi(y_t)`` over a vocabulary split across ``tp_group``.

    Forward: chunked local statistics, one all-to-all of ``[2, N]`` (local lse, target logit) and one
    all-gather of the finished ``[2, N/TP]`` slices. Backward: no communication; the incoming per-token
    gradient is the same on every TP rank (each computes the same loss from the same log-probs).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, tp_group, chunk_size):
        s, b, h = hidden.shape
        weight_c = weight.to(compute_dtype(weight.dtype))
        hidden_flat, targets_flat = hidden.reshape(s * b, h), targets.reshape(s * b)
        lse_local, target_logit = chunked_token_stats(
            hidden_flat, weight_c, targets_flat, None, vocab_start=vocab_start, chunk_size=chunk_size
        )
        if group_size(tp_group) == 1:
            lse_full, logprobs = lse_local, target_logit - lse_local
        else:
            recv = exchange_token_stats(torch.stack([lse_local, target_logit]), tp_group)
            lse_slice = torch.logsumexp(recv[:, 0], dim=0)
            logprob_slice = recv[:, 1].sum(dim=0) - lse_slice
            lse_full, logprobs = gather_token_slices(torch.stack([lse_slice, logprob_slice]), s * b, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse_full)
        ctx.vocab_start, ctx.chunk_size = vocab_start, chunk_size
        return logprobs.reshape(s, b)

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, lse_full = ctx.saved_tensors
        coef = grad_logprobs.reshape(-1).to(compute_dtype(weight.dtype))
        grad_hidden, grad_weight = shard_grads(ctx, hidden, weight, targets, None, lse_full, coef)
        return grad_hidden, grad_weight, None, None, None, None


def vocab_parallel_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token log-probs ``[s, b]`` (fp32, fp64 for fp64 inputs) of ``targets`` under ``W_full @ hidden``.

    ``hidden`` [s, b, h]: final hidden states of the tokens this rank holds (identical over ``tp_group``);
    ``weight`` [V/TP, h]: this rank's output-layer shard starting at full-vocabulary row ``vocab_start``;
    ``targets`` [s, b]: full-vocabulary ids, all in ``[0, V)``. Differentiable in ``hidden`` (the
    gradient is this TP rank's partial; Megatron's mapping reduces it) and ``weight`` (local).
    For sequence-level losses use :func:`vespo_megatron.loss.sequence.sequence_logprob_sums`, which
    moves ``[num_sequences]`` floats instead of per-token values.
    """
    check_logprob_inputs(hidden, weight, targets, vocab_start=vocab_start, chunk_size=chunk_size)
    check_targets_in_vocab(targets, weight.shape[0] * group_size(tp_group))
    return _VocabParallelTokenLogprobs.apply(hidden, weight, targets, vocab_start, tp_group, chunk_size)

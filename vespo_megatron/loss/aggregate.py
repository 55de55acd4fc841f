"""Reduce per-token or per-sequence losses to the scalar that is back-propagated.

The definitions of the modes are in docs/loss.md ("Aggregation"). For "token-mean" and the
"seq-mean-*" modes the caller passes the normaliser of the whole optimiser step (all micro-batches,
all data-parallel ranks): then the gradient of the step is the same however the batch is split into
micro-batches and ranks. "micro-token-mean" is the token mean of each micro-batch averaged over the
step's micro-batches (what Megatron does with a per-micro-batch mean loss, the official VESPO recipe's
setting): the caller passes the number of micro-batches of the whole step (all data-parallel ranks).
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("token-mean", "micro-token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

REFERENCE_AGGREGATION = {
    "vespo": "micro-token-mean",
    "grpo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "cispo": "token-mean",
}
"""Each loss's default aggregation: what its reference implementation uses (table in docs/loss.md)."""


def reference_aggregation(loss_name: str) -> str:
    """The aggregation mode ``loss_name``'s reference uses (``loss.aggregation: null`` picks it)."""
    if loss_name not in REFERENCE_AGGREGATION:
        raise ValueError(
            f"loss name {loss_name!r} has no reference aggregation; use one of {sorted(REFERENCE_AGGREGATION)}")
    return REFERENCE_AGGREGATION[loss_name]


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"loss aggregation mode={mode!r} is unknown; use one of {AGGREGATION_MODES}")


def _normaliser(global_count: float | int | torch.Tensor | None, local_count: torch.Tensor,
                name: str) -> torch.Tensor:
    """The global count when given, else the local one; floored at 1 so an empty batch gives 0."""
    if global_count is None:
        count = local_count
    else:
        if not isinstance(global_count, torch.Tensor) and global_count < 0:
            raise ValueError(f"{name}={global_count} must be >= 0; pass the step's total count")
        count = torch.as_tensor(global_count, device=local_count.device)
    return count.to(local_count.dtype if local_count.is_floating_point() else torch.float32).clamp(min=1)


def aggregate_sequence_loss(
    seq_loss: torch.Tensor,
    seq_lengths: torch.Tensor,
    mode: str = "token-mean",
    global_num_tokens: float | int | torch.Tensor | None = None,
    global_num_sequences: float | int | torch.Tensor | None = None,
    global_num_micro_batches: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss from per-sequence losses `seq_loss` [B] (each the sum of its token losses).

    `seq_lengths` [B] are the response token counts (whole sequences, also when this rank holds only a
    context-parallel share of the tokens). Sequences of length 0 count in no normaliser (their loss must
    be 0). The per-token and per-sequence forms agree exactly. `global_num_micro_batches` (only
    micro-token-mean) is the step's micro-batch count over all data-parallel ranks; None means 1.
    """
    _check_mode(mode)
    if seq_loss.shape != seq_lengths.shape or seq_loss.dim() != 1:
        raise ValueError(
            f"seq_loss {tuple(seq_loss.shape)} and seq_lengths {tuple(seq_lengths.shape)} must both be [B]"
        )
    lengths = seq_lengths.to(seq_loss.dtype)
    local_tokens = lengths.sum()
    local_sequences = (seq_lengths > 0).sum().to(seq_loss.dtype)
    if mode == "micro-token-mean":
        micro = 1.0 if global_num_micro_batches is None else _normaliser(
            global_num_micro_batches, local_tokens, "global_num_micro_batches")
        return seq_loss.sum() / _normaliser(None, local_tokens, "") / micro
    if mode == "token-mean":
        return seq_loss.sum() / _normaliser(global_num_tokens, local_tokens, "global_num_tokens")
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / lengths.clamp(min=1)
    return seq_loss.sum() / _normaliser(global_num_sequences, local_sequences, "global_num_sequences")


def aggregate_token_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token-mean",
    global_num_tokens: float | int | torch.Tensor | None = None,
    global_num_sequences: float | int | torch.Tensor | None = None,
    global_num_micro_batches: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss from per-token losses `token_loss` [B, S]; positions off `response_mask` are ignored.

    token-mean: sum / N_tokens; seq-mean-token-sum: sum / N_seq; seq-mean-token-mean: sum over
    sequences of (token mean) / N_seq; micro-token-mean: sum / this micro-batch's token count / N_micro.
    N_tokens and N_seq are `global_num_tokens` / `global_num_sequences`, or the local counts if None.
    """
    if token_loss.shape != response_mask.shape or token_loss.dim() != 2:
        raise ValueError(
            f"token_loss {tuple(token_loss.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be [B, S]"
        )
    mask = response_mask.bool()
    seq_loss = torch.where(mask, token_loss, torch.zeros_like(token_loss)).sum(dim=-1)
    return aggregate_sequence_loss(seq_loss, mask.sum(dim=-1), mode, global_num_tokens, global_num_sequences,
                                   global_num_micro_batches)

"""Supervised cross-entropy: the first user of the training plumbing and the RL warm-up.

The model's own vocabulary-parallel cross entropy (``labels=`` path of GPTModel) gives per-token losses;
the loss head returns Megatron's ``(loss_sum, num_tokens)`` pair so the step optimises the token mean
over the whole global batch (see :mod:`vespo_megatron.train.megatron_loss`).
"""

from __future__ import annotations

import torch


def sft_loss_head(output: torch.Tensor, batch: dict, model) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``output`` is GPTModel's per-token loss ``[b, s]``; masked sum, token count, and the report."""
    mask = batch["loss_mask"].to(output.dtype)
    loss_sum = (output.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"sft/loss": torch.stack([loss_sum.detach(), mask.sum()])}

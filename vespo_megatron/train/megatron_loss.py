"""The one adapter between our losses and Megatron's pipeline schedules.

Megatron's contract (``calculate_per_token_loss=True``, which we always set):

* ``forward_step(data_iterator, model)`` returns ``(output, loss_func)``; on the last pipeline stage the
  schedule calls ``loss_func(output)`` which must return ``(loss_sum, num_tokens, reported)``.
* The schedule back-propagates ``loss_sum`` as is (no division by micro-batch count or tokens),
  gradients are summed over micro-batches and, by DDP, over the data-parallel x context-parallel
  ranks (DDP's scaling factor is 1 with per-token loss), and ``finalize_model_grads`` finally all-reduces
  ``num_tokens`` over DP x CP and multiplies every gradient by ``1 / num_tokens``.

Hence: a loss whose value on one micro-batch is ``sum over its tokens of l_t`` with ``num_tokens`` its
token count yields the gradient of the **token mean over the whole step** (all micro-batches, all DP
ranks). For a context-parallel rank ``loss_sum`` covers only the tokens it holds and ``num_tokens`` its
local count; the sum over CP ranks is the full sequence. Losses that need a different global normaliser
(sequence mean, VESPO's per-sequence forms) return ``loss_sum = normalised_loss * num_tokens_global``
together with ``num_tokens = local share`` so that the division in ``finalize_model_grads`` cancels: see
:func:`rescale_for_global_normaliser`.

Tensor-parallel ranks all return the same ``loss_sum`` (they compute one replicated loss); Megatron does
not average over TP, so this is correct as is.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import torch

from vespo_megatron.models.gpt import model_device, unwrap
from vespo_megatron.train.batches import batch_to_device, packed_seq_params

# loss_head(output, batch, model_chunk) -> (loss_sum, num_tokens, reported: dict[str, tensor])
LossHead = Callable[[Any, dict, Any], tuple[torch.Tensor, torch.Tensor, dict]]


def rescale_for_global_normaliser(
    loss: torch.Tensor, local_tokens: torch.Tensor, global_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an already globally-normalised ``loss`` into Megatron's ``(loss_sum, num_tokens)`` pair.

    ``finalize_model_grads`` divides gradients by the all-reduced sum of ``num_tokens`` (= global tokens);
    multiplying the loss by ``global_tokens`` first makes that division a no-op.
    """
    return loss * global_tokens.to(device=loss.device, dtype=loss.dtype), local_tokens.to(torch.int)


def make_forward_step(loss_head: LossHead, emit_hidden_states: bool) -> Callable:
    """A Megatron ``forward_step_func`` that runs one micro-batch and hands its output to ``loss_head``.

    A packed micro-batch (``cu_seqlens`` present) runs in Megatron's THD format with ``PackedSeqParams``.
    """

    def forward_step(data_iterator: Iterator[dict], model):
        inner = unwrap(model)
        batch = batch_to_device(next(data_iterator), model_device(inner))
        inner.emit_hidden_states = emit_hidden_states
        output = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=None if emit_hidden_states else batch.get("labels"),
            packed_seq_params=packed_seq_params(batch),
        )
        return output, partial(_call_head, loss_head, batch, model)

    return forward_step


def _call_head(loss_head: LossHead, batch: dict, model, output):
    loss_sum, num_tokens, reported = loss_head(output, batch, model)
    packed = {name: value.detach().float().reshape(-1) for name, value in reported.items()}
    return loss_sum, num_tokens, packed

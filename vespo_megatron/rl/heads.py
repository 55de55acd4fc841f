"""Loss heads for the RL step: what the last pipeline stage computes from the final hidden states.

Each head has Megatron's loss-function shape (see :mod:`vespo_megatron.train.megatron_loss`) and is
built for one update, because the global normalisers (response tokens and sequences of the whole
update over every data-parallel rank) are known before the update starts.

* :func:`old_logprob_sums_head` (forward only): per-sequence ``sum_t log pi(y_t)`` through the
  sequence-parallel path: one ``[B]`` all-reduce over TP x CP, no per-token exchange across CP.
* :func:`vespo_head`: VESPO on the same path; the kernel is applied to the all-reduced sums.
* :func:`token_loss_head`: the token-level baselines (GRPO, GSPO, SAPO, CISPO) from vocabulary-
  parallel per-token log-probs.
Per-sequence diagnostics are reported as ``seq/*`` vectors for the loop's step metrics; per-token values
(``tok/*``) in the row layout ``[b, w]`` of the micro-batch's sequences, also for a packed micro-batch.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from vespo_megatron.loss import kernel
from vespo_megatron.loss.aggregate import aggregate_sequence_loss
from vespo_megatron.loss.logprobs import vocab_parallel_token_logprobs
from vespo_megatron.loss.policy import (
    PolicyLossInputs,
    get_policy_loss,
    vespo_sequence_loss,
)
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.models.gpt import full_hidden, unwrap
from vespo_megatron.rl.batch import row_layout, segment_ids
from vespo_megatron.train.megatron_loss import rescale_for_global_normaliser


def _groups(ctx):
    tp_group = ctx.tp_group if ctx.tp > 1 else None
    seq_group = ctx.tp_cp_group if ctx.tp * ctx.cp > 1 else None
    return tp_group, seq_group


def _sequence_sums(output, batch, model, ctx, temperature, chunk_size):
    weight = unwrap(model).output_weight()
    hidden = full_hidden(output, ctx) / temperature
    tp_group, seq_group = _groups(ctx)
    labels = batch["labels"]
    segments = segment_ids(batch["loss_mask"], batch.get("sequence_index"))
    sums, _ = sequence_logprob_sums(
        hidden, weight, labels.t().contiguous(), segments, batch["rows"].numel(),
        vocab_start=ctx.tp_rank * weight.shape[0], tp_group=tp_group, seq_group=seq_group, chunk_size=chunk_size,
    )
    return sums


def _token_logprobs(output, batch, model, ctx, temperature, chunk_size):
    weight = unwrap(model).output_weight()
    hidden = full_hidden(output, ctx) / temperature
    tp_group, _ = _groups(ctx)
    logprobs = vocab_parallel_token_logprobs(
        hidden, weight, batch["labels"].t().contiguous(), vocab_start=ctx.tp_rank * weight.shape[0],
        tp_group=tp_group, chunk_size=chunk_size,
    )
    return row_layout(batch, logprobs.t())


def _no_loss(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(loss_sum, num_tokens)`` pair of a forward-only head, on ``device``."""
    return torch.zeros((), device=device), torch.zeros((), dtype=torch.int, device=device)


def old_logprob_sums_head(ctx, temperature: float, chunk_size: int):
    def head(output, batch, model):
        sums = _sequence_sums(output, batch, model, ctx, temperature, chunk_size)
        return *_no_loss(sums.device), {"seq/logprob_sum": sums}

    return head


def old_token_logprobs_head(ctx, temperature: float, chunk_size: int):
    def head(output, batch, model):
        logprobs = _token_logprobs(output, batch, model, ctx, temperature, chunk_size)
        return *_no_loss(logprobs.device), {"tok/logprobs": logprobs}

    return head


class NonFiniteLogprobsError(ValueError):
    """The policy's log-probs (or the old/sampler log-probs they are compared with) are NaN or infinite."""


def _where(batch: dict, rows: torch.Tensor, label: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    ids = batch["rows"][rows].tolist() if "rows" in batch else rows.tolist()
    return f"{label or 'RL update'}, rank {rank}, rollout rows {ids[:8]}"


def check_finite_sums(batch: dict, label: str, **sums: torch.Tensor) -> None:
    """Raise NonFiniteLogprobsError naming the update, rank and sequences when a per-sequence sum is not finite.

    One reduction per tensor: cheap next to the forward pass it follows.
    """
    for name, value in sums.items():
        bad = ~torch.isfinite(value.detach())
        if bad.any():
            raise NonFiniteLogprobsError(
                f"{_where(batch, bad.nonzero().flatten(), label)}: {int(bad.sum())} non-finite {name}; the weights or "
                "the input diverged (lower optimizer.lr, check the rollout's sampler_logprobs and loss.correction)")


def check_policy_inputs(inputs: PolicyLossInputs, batch: dict, label: str) -> None:
    """``inputs.validate`` on the training path, its error prefixed with the update, rank and sequences."""
    try:
        inputs.validate(allow_empty_rows=True)
    except ValueError as err:
        bad = torch.zeros(inputs.advantages.shape[0], dtype=torch.bool)
        mask = inputs.response_mask.bool()
        for value in (inputs.logprobs, inputs.old_logprobs, inputs.sampler_logprobs):
            if value is not None:
                bad |= (~torch.isfinite(value.detach()) & mask).any(dim=-1)
        bad |= ~torch.isfinite(inputs.advantages.detach())
        raise NonFiniteLogprobsError(f"{_where(batch, bad.nonzero().flatten(), label)}: {err}") from None


def kl_penalty(logprob_sum: torch.Tensor, batch: dict, kl_coef: float) -> torch.Tensor:
    """Per-sequence KL-to-reference term ``kl_coef * sg(S - S_ref) * S`` (zero without a reference).

    Its gradient, ``kl_coef * (S - S_ref) * grad S``, is the score-function estimate of the gradient of
    KL(pi || pi_ref) on the sampled sequences.
    """
    if kl_coef == 0 or "ref_logprob_sums" not in batch:
        return torch.zeros_like(logprob_sum)
    return kl_coef * (logprob_sum.detach() - batch["ref_logprob_sums"].to(logprob_sum.dtype)) * logprob_sum


def _finish(loss, batch, global_tokens, reported, global_micro_batches: int, report_weight: float = 1.0):
    """Megatron's (loss_sum, num_tokens) pair plus the ``loss/value`` report.

    ``loss`` is this micro-batch's share of the update's loss (its terms over the global normaliser), so
    the update's loss is the sum of the shares. The engine reduces a report pair ``[value, weight]`` as
    sum(value) / sum(weight) over micro-batches and DP x CP ranks; reporting ``[loss * n_micro, weight]``
    turns that into the sum of the shares. ``report_weight`` is 1 when every rank of the CP group holds
    the whole loss (VESPO) and 1/cp when each holds the part of its own tokens (token losses).
    """
    local_tokens = batch["loss_mask"].sum()
    loss_sum, num_tokens = rescale_for_global_normaliser(loss, local_tokens, global_tokens)
    reported["loss/value"] = torch.stack([loss.detach().float() * global_micro_batches,
                                           torch.tensor(report_weight, device=loss.device)])
    return loss_sum, num_tokens, reported


def vespo_head(ctx, config, global_tokens: torch.Tensor, global_sequences: torch.Tensor,
               global_micro_batches: int = 1, label: str = ""):
    """VESPO on the sequence-parallel path (docs/loss.md): ``-phi(W) A S_seq`` aggregated.

    The ``global_*`` counts are the update's normalisers over every micro-batch and data-parallel rank;
    ``label`` (e.g. "RL step 3, update 2") prefixes the error raised on non-finite log-probs.
    """
    loss_cfg, params = config.loss, config.loss.params()
    correction = loss_cfg.correction
    temperature = config.rollout.temperature

    def head(output, batch, model):
        sums = _sequence_sums(output, batch, model, ctx, temperature, loss_cfg.chunk_size)
        old = batch["old_logprob_sums"]
        check_finite_sums(batch, label, **{"policy log-prob sums": sums, "old log-prob sums": old,
                                           "sampler log-prob sums": batch["sampler_logprob_sums"],
                                           "advantages": batch["advantages"]})
        ones = torch.ones_like(old).unsqueeze(1)
        term, keep = kernel.train_inference_log_correction(
            old.unsqueeze(1), batch["sampler_logprob_sums"].unsqueeze(1), ones, correction.mode, "sequence",
            correction.tis_threshold, correction.mis_lower, correction.mis_upper,
        )
        log_w = sums.detach() - old + term
        advantages = batch["advantages"]
        lengths = batch["response_lengths"]
        seq_loss, _ = vespo_sequence_loss(sums, log_w, advantages, params, keep, lengths)
        seq_loss = seq_loss + kl_penalty(sums, batch, config.rl.kl_coef)
        loss = aggregate_sequence_loss(seq_loss, lengths.to(seq_loss.dtype), loss_cfg.aggregation_mode,
                                       global_tokens, global_sequences, global_micro_batches)
        phi = kernel.vespo_phi(log_w, advantages, params.k_pos, params.lambda_pos, params.k_neg, params.lambda_neg)
        reported = {
            "seq/log_w": kernel.clamp_log_w(log_w),
            "seq/phi": phi * keep.to(phi.dtype),
            "seq/advantage": advantages,
            "seq/length": lengths.float(),
            "seq/logprob_sum": sums.detach(),
            "seq/old_logprob_sum": old,
            "seq/row": batch["rows"],
        }
        return _finish(loss, batch, global_tokens, reported, global_micro_batches)

    return head


def token_loss_head(ctx, config, global_tokens: torch.Tensor, global_sequences: torch.Tensor,
                    global_micro_batches: int = 1, label: str = ""):
    """A token-level baseline from the registry on per-token log-probs (normalisers as in :func:`vespo_head`)."""
    loss_cfg, params = config.loss, config.loss.params()
    policy = get_policy_loss(loss_cfg.name)
    temperature = config.rollout.temperature
    correction = loss_cfg.correction
    # Under CP a rank holds part of each sequence: a sequence-level correction needs the whole sequence's
    # log-ratio, taken from the per-sequence sums the batch carries (the outer clamp only, as for VESPO).
    sequence_weight_from_sums = ctx.cp > 1 and correction.mode != "none" and correction.level == "sequence"
    if sequence_weight_from_sums:
        params = dataclasses.replace(params, correction=dataclasses.replace(correction, mode="none"))

    def head(output, batch, model):
        logprobs = _token_logprobs(output, batch, model, ctx, temperature, loss_cfg.chunk_size)
        mask = row_layout(batch, batch["loss_mask"])
        inputs = PolicyLossInputs(
            logprobs=logprobs,
            old_logprobs=batch["old_logprobs"],
            advantages=batch["advantages"],
            response_mask=mask,
            sampler_logprobs=batch["sampler_logprobs"],
        )
        check_policy_inputs(inputs, batch, label)
        out = policy(inputs, params)
        token_loss = out.token_loss
        if sequence_weight_from_sums:
            old_sums = batch["old_logprob_sums"]
            term, keep = kernel.train_inference_log_correction(
                old_sums.unsqueeze(1), batch["sampler_logprob_sums"].unsqueeze(1),
                torch.ones_like(old_sums).unsqueeze(1),
                correction.mode, "sequence", correction.tis_threshold, correction.mis_lower, correction.mis_upper,
            )
            token_loss = token_loss * (term.exp() * keep.to(term.dtype)).unsqueeze(1).to(token_loss.dtype)
        lengths = batch["response_lengths"]
        logprob_sums = (logprobs * mask).sum(dim=1)
        seq_loss = token_loss.sum(dim=1) + kl_penalty(logprob_sums, batch, config.rl.kl_coef)
        loss = aggregate_sequence_loss(seq_loss, lengths.to(token_loss.dtype), loss_cfg.aggregation_mode,
                                       global_tokens, global_sequences, global_micro_batches)
        log_ratio = ((logprobs.detach() - batch["old_logprobs"]) * mask).sum(dim=1)
        reported = {
            "seq/log_w": log_ratio,
            "seq/advantage": batch["advantages"],
            "seq/length": lengths.float(),
            "seq/row": batch["rows"],
        }
        if ctx.cp == 1:  # whole sequences on this rank: the sums the mismatch metrics can take from the update
            reported["seq/logprob_sum"] = logprob_sums.detach()
        for name, value in out.metrics.items():
            if name.endswith("clip_frac") or name.endswith("_frac"):
                reported[name] = torch.tensor([float(value), 1.0], device=loss.device)
        return _finish(loss, batch, global_tokens, reported, global_micro_batches, 1.0 / ctx.cp)

    return head

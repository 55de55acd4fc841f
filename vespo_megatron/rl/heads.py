"""Loss heads for the RL step: what the last pipeline stage computes from the final hidden states.

Each head has Megatron's loss-function shape (see :mod:`vespo_megatron.train.megatron_loss`) and is
built for one update, because the global normalisers (response tokens and sequences of the whole
update over every data-parallel rank) are known before the update starts.

* :func:`old_logprob_sums_head` (forward only): per-sequence ``sum_t log pi(y_t)`` through the
  sequence-parallel path: one ``[B]`` all-reduce over TP x CP, no per-token exchange across CP.
* :func:`vespo_head`: VESPO on the same path; the kernel is applied to the all-reduced sums.
* :func:`token_loss_head`: the token-level baselines (GRPO, GSPO, SAPO, CISPO) from vocabulary-
  parallel per-token log-probs.
Per-sequence diagnostics are reported as ``seq/*`` vectors for the loop's step metrics.
"""

from __future__ import annotations

import torch

from vespo_megatron.loss import kernel
from vespo_megatron.loss.aggregate import aggregate_sequence_loss
from vespo_megatron.loss.logprobs import vocab_parallel_token_logprobs
from vespo_megatron.loss.policy import PolicyLossInputs, get_policy_loss, vespo_sequence_loss
from vespo_megatron.loss.sequence import sequence_logprob_sums
from vespo_megatron.models.gpt import unwrap
from vespo_megatron.rl.batch import segment_ids
from vespo_megatron.rollout.generate import full_hidden
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
    sums, _ = sequence_logprob_sums(
        hidden, weight, labels.t().contiguous(), segment_ids(batch["loss_mask"]), labels.shape[0],
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
    return logprobs.t()


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


def kl_penalty(logprob_sum: torch.Tensor, batch: dict, kl_coef: float) -> torch.Tensor:
    """Per-sequence KL-to-reference term ``kl_coef * sg(S - S_ref) * S`` (zero without a reference).

    Its gradient, ``kl_coef * (S - S_ref) * grad S``, is the score-function estimate of the gradient of
    KL(pi || pi_ref) on the sampled sequences.
    """
    if kl_coef == 0 or "ref_logprob_sums" not in batch:
        return torch.zeros_like(logprob_sum)
    return kl_coef * (logprob_sum.detach() - batch["ref_logprob_sums"].to(logprob_sum.dtype)) * logprob_sum


def _finish(loss, batch, global_tokens, reported, report_weight: float = 1.0):
    """Megatron's (loss_sum, num_tokens) pair plus the ``loss/value`` report.

    ``report_weight`` is this rank's share of a replicated loss report: 1 when every rank of the CP
    group holds the whole loss (VESPO), 1/cp when each holds the part of its own tokens (token losses),
    so the reduction over DP x CP yields the update's loss either way.
    """
    local_tokens = batch["loss_mask"].sum()
    loss_sum, num_tokens = rescale_for_global_normaliser(loss, local_tokens, global_tokens)
    reported["loss/value"] = torch.stack([loss.detach().float(),
                                           torch.tensor(report_weight, device=loss.device)])
    return loss_sum, num_tokens, reported


def vespo_head(ctx, config, global_tokens: torch.Tensor, global_sequences: torch.Tensor):
    """VESPO on the sequence-parallel path (docs/loss.md): ``-phi(W) A S_seq`` aggregated."""
    loss_cfg, params = config.loss, config.loss.params()
    correction = loss_cfg.correction
    temperature = config.rollout.temperature

    def head(output, batch, model):
        sums = _sequence_sums(output, batch, model, ctx, temperature, loss_cfg.chunk_size)
        old = batch["old_logprob_sums"]
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
        loss = aggregate_sequence_loss(seq_loss, lengths.to(seq_loss.dtype), loss_cfg.aggregation,
                                       global_tokens, global_sequences)
        phi = kernel.vespo_phi(log_w, advantages, params.k_pos, params.lambda_pos, params.k_neg, params.lambda_neg)
        reported = {
            "seq/log_w": kernel.clamp_log_w(log_w),
            "seq/phi": phi * keep.to(phi.dtype),
            "seq/advantage": advantages,
            "seq/length": lengths.float(),
            "seq/logprob_sum": sums.detach(),
            "seq/old_logprob_sum": old,
        }
        return _finish(loss, batch, global_tokens, reported)

    return head


def token_loss_head(ctx, config, global_tokens: torch.Tensor, global_sequences: torch.Tensor):
    """A token-level baseline from the registry on per-token log-probs."""
    loss_cfg, params = config.loss, config.loss.params()
    policy = get_policy_loss(loss_cfg.name)
    temperature = config.rollout.temperature

    def head(output, batch, model):
        logprobs = _token_logprobs(output, batch, model, ctx, temperature, loss_cfg.chunk_size)
        mask = batch["loss_mask"]
        inputs = PolicyLossInputs(
            logprobs=logprobs,
            old_logprobs=batch["old_logprobs"],
            advantages=batch["advantages"],
            response_mask=mask,
            sampler_logprobs=batch["sampler_logprobs"],
        )
        out = policy(inputs, params)
        lengths = batch["response_lengths"]
        seq_loss = out.token_loss.sum(dim=1) + kl_penalty((logprobs * mask).sum(dim=1), batch, config.rl.kl_coef)
        loss = aggregate_sequence_loss(seq_loss, lengths.to(out.token_loss.dtype),
                                       loss_cfg.aggregation, global_tokens, global_sequences)
        log_ratio = ((logprobs.detach() - batch["old_logprobs"]) * mask).sum(dim=1)
        reported = {
            "seq/log_w": log_ratio,
            "seq/advantage": batch["advantages"],
            "seq/length": lengths.float(),
        }
        for name, value in out.metrics.items():
            if name.endswith("clip_frac") or name.endswith("_frac"):
                reported[name] = torch.tensor([float(value), 1.0], device=loss.device)
        return _finish(loss, batch, global_tokens, reported, 1.0 / ctx.cp)

    return head

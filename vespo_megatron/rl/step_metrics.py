"""Per-step metrics of the RL loop (docs/metrics.md): rewards, lengths, mismatch, partial rollouts, phi.

Every function is collective over the trainer's data-parallel ranks (each rank holds its share of the step)
and returns the same numbers on every rank.
"""

from __future__ import annotations

import torch

from vespo_megatron.loss.metrics import effective_sample_size
from vespo_megatron.rl.batch import Rollout
from vespo_megatron.runtime.collectives import gather_objects, max_over, sum_over
from vespo_megatron.runtime.distributed import ParallelContext


def mismatch_metrics(rollout: Rollout, ctx: ParallelContext) -> dict[str, float]:
    """The trainer's log-probs as the rollout enters training against the sampler's (``mismatch/*``).

    Per sequence, ``d = sum_t (log pi_trainer - log mu_sampler)``: mean and max of ``|d|`` and the k1 estimate
    ``mean(-d)`` of KL(mu || pi_trainer) per sequence; per token the mean and max of ``|log pi_trainer -
    log mu_sampler|`` where the trainer's per-token log-probs exist (token-level losses under recompute).
    With the same weights on both sides (colocated, or disaggregated at lag 0) this is the train/inference
    mismatch alone; with a lag it also holds the policy change.
    """
    if rollout.trainer_logprob_sums is None:
        return {}
    responded = rollout.response_lengths > 0
    diff = (rollout.trainer_logprob_sums - rollout.sampler_logprob_sums())[responded].double()
    abs_sum, kl_sum, count = sum_over([diff.abs().sum().item(), (-diff).sum().item(), float(diff.numel())],
                                      ctx.dp_group)
    local_max = [diff.abs().max().item() if diff.numel() else 0.0]
    metrics = {"mismatch/seq_abs_log_ratio_mean": abs_sum / max(count, 1.0),
               "mismatch/seq_abs_log_ratio_max": max_over(local_max, ctx.dp_group)[0],
               "mismatch/kl_k1_per_seq": kl_sum / max(count, 1.0)}
    if rollout.old_token_logprobs is not None and rollout.trainer_logprob_sums is rollout.old_logprob_sums:
        mask = rollout.response_token_mask()[:, 1:].bool()
        token_diff = (rollout.old_token_logprobs - rollout.sampler_logprobs[:, 1:])[mask].double().abs()
        total, tokens = sum_over([token_diff.sum().item(), float(token_diff.numel())], ctx.dp_group)
        metrics["mismatch/token_abs_log_ratio_mean"] = total / max(tokens, 1.0)
        metrics["mismatch/token_abs_log_ratio_max"] = max_over(
            [token_diff.max().item() if token_diff.numel() else 0.0], ctx.dp_group)[0]
    return metrics


def partial_metrics(rollout: Rollout, ctx: ParallelContext) -> dict[str, float]:
    """Partial rollouts: how many policy versions the step's sequences span (``partial/*``)."""
    if rollout.token_versions is None:
        return {}
    sampled = rollout.token_versions >= 0
    newest = torch.where(sampled, rollout.token_versions, -1).amax(dim=1)
    oldest = torch.where(sampled, rollout.token_versions, torch.iinfo(torch.long).max).amin(dim=1)
    span = (newest - oldest).clamp(min=0).double()
    mixed, count = sum_over([float((span > 0).sum()), float(span.numel())], ctx.dp_group)
    return {"partial/mixed_sequences_frac": mixed / max(count, 1.0),
            "partial/version_span_max": max_over([float(span.max()) if span.numel() else 0.0], ctx.dp_group)[0]}


def rollout_metrics(rollout: Rollout, ctx: ParallelContext) -> dict[str, float]:
    """Rewards, accuracy and response lengths of the step, with the mismatch, partial and KL metrics."""
    generated = (rollout.generated_lengths if rollout.generated_lengths is not None
                 else rollout.response_lengths).float()
    correct = (rollout.rewards >= 1.0).float()
    sums = sum_over([rollout.rewards.sum().item(), correct.sum().item(), generated.sum().item(),
                     float(rollout.size)], ctx.dp_group)
    metrics = mismatch_metrics(rollout, ctx) | partial_metrics(rollout, ctx)
    if rollout.routing_mismatch_frac is not None:  # already reduced over all ranks
        metrics["rollout/routing_mismatch_frac"] = float(rollout.routing_mismatch_frac)
    if rollout.ref_logprob_sums is not None:
        kl_sum, tokens = sum_over([(rollout.old_logprob_sums - rollout.ref_logprob_sums).sum().item(),
                                   rollout.response_lengths.sum().item()], ctx.dp_group)
        metrics["kl/ref_k1_per_token"] = kl_sum / max(tokens, 1.0)
    return metrics | {
        "reward/mean": sums[0] / sums[3],
        "reward/accuracy": sums[1] / sums[3],
        "response/length_mean": sums[2] / sums[3],
        "response/tokens": sums[2],
    }


def phi_metrics(results: list, ctx: ParallelContext) -> dict[str, float]:
    """Loss diagnostics (``vespo/*``) from the per-sequence vectors of every micro-batch and DP rank.

    ``results`` are the engine's step results of one RL step; only the last pipeline stage holds the vectors
    (the gather runs over that stage's data-parallel group), other stages return ``{}``.
    """
    if not ctx.is_last_stage:
        return {}
    vectors: dict[str, list] = {}
    for result in results:
        for report in result.reported:
            for key, value in report.items():
                if key.startswith("seq/"):
                    vectors.setdefault(key, []).append(value)
    local = {k: torch.cat(v).cpu() for k, v in vectors.items()}
    gathered = gather_objects(local, ctx.dp_group)
    local = {k: torch.cat([g[k] for g in gathered]) for k in local}
    if "seq/log_w" not in local:
        return {}
    log_w, adv = local["seq/log_w"], local["seq/advantage"]
    out = {"vespo/abs_log_w_mean": float(log_w.abs().mean()), "vespo/abs_log_w_max": float(log_w.abs().max())}
    if "seq/phi" in local:
        phi = local["seq/phi"]
        out["vespo/phi_mean"] = float(phi.mean())
        for name, sel in (("pos", adv >= 0), ("neg", adv < 0)):
            if sel.any():
                out[f"vespo/phi_mean_{name}"] = float(phi[sel].mean())
                out[f"vespo/phi_min_{name}"] = float(phi[sel].min())
                out[f"vespo/phi_max_{name}"] = float(phi[sel].max())
        out["vespo/silenced_frac"] = float((phi < 1e-3).float().mean())
        out["vespo/ess"] = float(effective_sample_size(phi))
    return out

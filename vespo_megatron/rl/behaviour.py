"""A sampled batch becomes trainable: group advantages, then the behaviour log-probs mu per ``loss.behaviour``.

``recompute``: a forward pass of the trainer's current weights (the sampling weights when the rollout is
fresh). ``sampler``: the sampler's own per-token log-probs, no forward pass. The mismatch metrics
(``rl.mismatch_metrics``) then need the trainer's log-probs as the rollout enters training: with one
mini-batch per step the update's own forward pass gives them (:func:`update_measures_mismatch`), otherwise
one forward pass here does. The frozen KL reference's log-probs are computed here too.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from vespo_megatron.config import Config
from vespo_megatron.models.routing import routing_recorder
from vespo_megatron.rl.advantages import group_advantages, informative_groups
from vespo_megatron.rl.batch import Rollout, config_micro_batches
from vespo_megatron.rl.heads import old_logprob_sums_head, old_token_logprobs_head
from vespo_megatron.runtime.collectives import from_last_stage, gather_context_parallel
from vespo_megatron.train.engine import Engine


def finish_rollout(config: Config, engine: Engine, sequences: torch.Tensor, prompt_lengths: torch.Tensor,
                   response_lengths: torch.Tensor, sampler_logprobs: torch.Tensor, rewards: torch.Tensor, version: int,
                   routing_indices: Optional[torch.Tensor] = None, step_index: int = 0,
                   token_versions: Optional[torch.Tensor] = None) -> Rollout:
    """Advantages and behaviour log-probs of sampled (or received) sequences: a trainable :class:`Rollout`."""
    group = config.rollout.group_size
    grouped = rewards.view(-1, group)
    advantages = group_advantages(grouped, config.rl.std_normalize_advantages).reshape(-1)
    trained_lengths = response_lengths.clone()
    if config.rl.filter_uniform_groups:
        keep = informative_groups(grouped).repeat_interleave(group)
        trained_lengths = torch.where(keep, response_lengths, torch.zeros_like(response_lengths))
    rollout = Rollout(
        sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=trained_lengths,
        sampler_logprobs=sampler_logprobs, rewards=rewards, advantages=advantages,
        generated_lengths=response_lengths, behaviour_version=version, routing_indices=routing_indices,
        step_index=step_index, token_versions=token_versions,
    )
    compute_old_logprobs(config, engine, rollout)
    return rollout


def compute_old_logprobs(config: Config, engine: Engine, rollout: Rollout) -> None:
    """Behaviour log-probs (log mu) per ``loss.behaviour``, on every pipeline stage."""
    ctx = engine.ctx
    micro = config_micro_batches(config, rollout, torch.arange(rollout.size), ctx)
    token_level = config.loss.name != "vespo"
    if config.loss.behaviour == "sampler":
        use_sampler_logprobs(rollout, token_level=token_level)
        if config.rl.mismatch_metrics and not update_measures_mismatch(config, engine):
            rollout.trainer_logprob_sums = logprob_sums(config, engine, micro, engine.chunks)
        if engine.reference_chunks is not None:
            rollout.ref_logprob_sums = logprob_sums(config, engine, micro, engine.reference_chunks)
        return
    head = (old_token_logprobs_head if token_level else old_logprob_sums_head)(
        ctx, config.rollout.temperature, config.loss.chunk_size)
    # MoE routing replay: the sampler's experts when it recorded them (replayed here too, counting the
    # tokens whose own choice differs), else the experts of this behaviour pass.
    recorder = routing_recorder(engine) if config.rollout.routing_replay else None
    from_sampler = recorder is not None and rollout.routing_indices is not None
    if from_sampler:
        with recorder.replaying([batch["routing_indices"] for batch in micro]), recorder.measuring_mismatch():
            reports = engine.forward_only(micro, head, emit_hidden_states=True)
    else:
        with recorder.recording() if recorder is not None else nullcontext():
            reports = engine.forward_only(micro, head, emit_hidden_states=True)
        if recorder is not None:
            rollout.routing_indices = recorder.recorded_indices(micro)
    if recorder is not None:  # collective on every rank: None when no rank replayed a sampler record
        mismatch = recorder.mismatch_fraction()
        rollout.routing_mismatch_frac = None if mismatch is None else torch.tensor(mismatch)
    if token_level:
        values = torch.zeros(rollout.size, config.seq_length)
        for batch, report in zip(micro, reports):  # reports exist on the last stage (all of its CP ranks) only
            local = report["tok/logprobs"].view(batch["rows"].numel(), -1).cpu()
            full = gather_context_parallel(local, ctx.cp_group)
            values[batch["rows"], :full.shape[1]] = full
    else:
        values = per_row(micro, reports, "seq/logprob_sum", rollout.size)
    values = from_last_stage(values, ctx.pp_group)
    if token_level:
        rollout.old_token_logprobs = values
        rollout.old_logprob_sums = (values * rollout.response_token_mask()[:, 1:]).sum(dim=1)
    else:
        rollout.old_logprob_sums = values
    rollout.trainer_logprob_sums = rollout.old_logprob_sums
    if engine.reference_chunks is not None:
        rollout.ref_logprob_sums = logprob_sums(config, engine, micro, engine.reference_chunks)


def update_measures_mismatch(config: Config, engine: Engine) -> bool:
    """Whether the step's update reports the trainer's per-sequence log-prob sums the mismatch metrics need.

    True with one mini-batch per step (``rl.num_minibatches=1``: its forward pass runs at exactly the weights
    the rollout enters training with; dropout is 0 in every model built here) and a loss head that holds
    whole-sequence sums: VESPO (all-reduced over TP x CP) or a token-level loss without context parallelism.
    The sums are then read from the update (:func:`update_logprob_sums`) instead of a forward pass of their own.
    """
    return config.rl.num_minibatches == 1 and (config.loss.name == "vespo" or engine.ctx.cp == 1)


def update_logprob_sums(reported: list[dict], size: int, engine: Engine) -> torch.Tensor:
    """The per-sequence ``seq/logprob_sum`` of an update's micro-batch reports in rollout-row order, on every
    pipeline stage (``reported`` is empty before the last stage)."""
    rows = [{"rows": report["seq/row"].cpu().long()} for report in reported]
    return from_last_stage(per_row(rows, reported, "seq/logprob_sum", size), engine.ctx.pp_group)


def use_sampler_logprobs(rollout: Rollout, token_level: bool) -> None:
    """Take the sampler's per-token log-probs as the behaviour policy (``loss.behaviour=sampler``)."""
    mask = rollout.response_token_mask()
    rollout.old_logprob_sums = (rollout.sampler_logprobs * mask).sum(dim=1)
    if token_level:
        rollout.old_token_logprobs = (rollout.sampler_logprobs * mask)[:, 1:].contiguous()


def logprob_sums(config: Config, engine: Engine, micro: list[dict], chunks: list) -> torch.Tensor:
    """Per-sequence log-prob sums under ``chunks`` (the trainer's, or the frozen KL reference), on every stage."""
    head = old_logprob_sums_head(engine.ctx, config.rollout.temperature, config.loss.chunk_size)
    reports = engine.forward_only(micro, head, emit_hidden_states=True, chunks=chunks)
    size = sum(batch["rows"].numel() for batch in micro)
    return from_last_stage(per_row(micro, reports, "seq/logprob_sum", size), engine.ctx.pp_group)


def per_row(micro: list[dict], reports: list[dict], name: str, size: int) -> torch.Tensor:
    """The per-sequence report ``name`` of every micro-batch, put back in rollout-row order ([size], CPU).

    Zeros where no report exists (stages before the last one)."""
    values = torch.zeros(size)
    for batch, report in zip(micro, reports):
        values[batch["rows"]] = report[name].cpu()
    return values

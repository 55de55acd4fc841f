"""One RL step, as a straight line: rollout -> rewards -> advantages -> old log-probs -> N updates.

:func:`collect_rollout` samples (or reads) this data-parallel rank's share of the step's prompts,
scores them and computes group advantages, then evaluates the old-policy log-probs with the weights
that sampled them (they are the behaviour policy mu of the VESPO weight, also when the rollout is
trained on K updates later). :func:`train_on_rollout` splits a rollout into ``rl.num_minibatches``
mini-batches of whole groups (contiguous; ``rl.shuffle_groups`` permutes the groups first) and applies
one optimizer update per mini-batch: the first sees ``log W = 0`` (on-policy when K = 0), later ones an
increasingly stale behaviour policy.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.models.routing import routing_recorder
from vespo_megatron.rl.advantages import group_advantages, informative_groups
from vespo_megatron.rl.batch import Rollout, micro_batches, minibatch_rows
from vespo_megatron.rl.heads import old_logprob_sums_head, old_token_logprobs_head, token_loss_head, vespo_head
from vespo_megatron.rollout.common import DecodeRequest, draw_uniforms
from vespo_megatron.rollout.decoders import sample
from vespo_megatron.runtime.distributed import collective_device
from vespo_megatron.train.batches import context_parallel_chunks


def _dp_sum(values: list[float], ctx) -> list[float]:
    if ctx.dp == 1:
        return torch.tensor(values, dtype=torch.float64).tolist()
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(ctx.dp_group))
    dist.all_reduce(tensor, group=ctx.dp_group)
    return tensor.tolist()


def score(task, tokenizer, generated, samples) -> torch.Tensor:
    """Rewards of the generated responses (decoded up to the stop token)."""
    texts = []
    for row in range(generated.sequences.shape[0]):
        start = int(generated.prompt_lengths[row])
        ids = generated.sequences[row, start : start + int(generated.response_lengths[row])].tolist()
        stops = [ids.index(stop) for stop in tokenizer.stop_ids if stop in ids]
        if stops:
            ids = ids[: min(stops)]
        texts.append(tokenizer.decode(ids))
    return torch.tensor(task.rewards(texts, samples), dtype=torch.float32)


def rollout_generator(cfg, step: int, dp_rank: int) -> torch.Generator:
    """The sampling generator of RL step ``step`` for the trainer's data-parallel rank ``dp_rank``.

    Rollout workers seed with the same function, so a disaggregated run samples what a colocated one would.
    """
    return torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + dp_rank)


def share_uniforms(cfg, step: int, shares: int, sequences_per_share: int) -> torch.Tensor:
    """The uniforms table of ``shares`` trainer data-parallel shares of RL step ``step``, side by side.

    Each share draws from its own :func:`rollout_generator`, so decoding every share in one batch samples
    exactly what decoding them one by one (or on the colocated ranks) samples.
    """
    return torch.cat([draw_uniforms(rollout_generator(cfg, step, share), cfg.rollout.max_new_tokens,
                                    sequences_per_share) for share in range(shares)], dim=1)


def sample_and_score(engine, cfg, tokenizer, task, prompts: list, generator: Optional[torch.Generator],
                     uniforms: Optional[torch.Tensor] = None, policy_version=None):
    """``group_size`` responses per prompt with ``engine``'s current weights, and their rewards.

    The one call into the sampler for RL steps (colocated ranks and rollout workers alike). ``uniforms``
    (from :func:`share_uniforms`) replaces ``generator`` when several shares are decoded as one batch;
    ``policy_version`` (partial rollouts) is polled before every decode step (:func:`~vespo_megatron.rollout.decode.decode`).
    """
    group = cfg.rollout.group_size
    samples = [s for s in prompts for _ in range(group)]
    encoded = [tokenizer.encode_prompt(s.prompt) for s in samples]
    stop = tuple(tuple(tokenizer.encode(text)) for text in cfg.rollout.stop)
    request = DecodeRequest(
        cfg.rollout, seq_length=cfg.seq_length, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
        generator=generator, uniforms=uniforms, vocab_size=tokenizer.vocab_size, stop_sequences=stop,
    )
    generated = sample(engine, encoded, request, record_routing=cfg.rollout.routing_replay,
                       policy_version=policy_version)
    return generated, score(task, tokenizer, generated, samples)


def sample_rollout(runner, step: int, prompts: list, version: int) -> Rollout:
    """Sample ``group_size`` responses per prompt with the current weights and score them."""
    cfg, ctx = runner.config, runner.engine.ctx
    runner.engine.gather_params()  # the decoder reads parameters outside DDP's forward hooks (lean step)
    generated, rewards = sample_and_score(runner.engine, cfg, runner.tokenizer, runner.task, prompts,
                                          rollout_generator(cfg, step, ctx.dp_rank))
    return finish_rollout(runner, generated.sequences, generated.prompt_lengths, generated.response_lengths,
                          generated.sampler_logprobs, rewards, version, routing_indices=generated.routing_indices,
                          step_index=step)


def read_external_rollout(runner, version: int) -> Rollout:
    """This DP rank's groups from the external JSONL (every rank reads the file, takes its share)."""
    cfg, ctx = runner.config, runner.engine.ctx
    groups = cfg.rollout.prompts_per_step
    batch = runner.external.next_groups(groups)
    per_rank = groups // ctx.dp * cfg.rollout.group_size
    rows = torch.arange(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    return finish_rollout(runner, batch.sequences[rows], batch.prompt_lengths[rows], batch.response_lengths[rows],
                           batch.sampler_logprobs[rows], batch.rewards[rows], version, step_index=runner.step)


def finish_rollout(runner, sequences, prompt_lengths, response_lengths, sampler_logprobs, rewards, version,
                   routing_indices=None, step_index: int = 0, token_versions=None):
    """Advantages and behaviour log-probs of sampled (or received) sequences: a trainable :class:`Rollout`."""
    cfg = runner.config
    group = cfg.rollout.group_size
    grouped = rewards.view(-1, group)
    advantages = group_advantages(grouped, cfg.rl.std_normalize_advantages).reshape(-1)
    trained_lengths = response_lengths.clone()
    if cfg.rl.filter_uniform_groups:
        keep = informative_groups(grouped).repeat_interleave(group)
        trained_lengths = torch.where(keep, response_lengths, torch.zeros_like(response_lengths))
    rollout = Rollout(
        sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=trained_lengths,
        sampler_logprobs=sampler_logprobs, rewards=rewards, advantages=advantages,
        generated_lengths=response_lengths, behaviour_version=version, routing_indices=routing_indices,
        step_index=step_index, token_versions=token_versions,
    )
    compute_old_logprobs(runner, rollout)
    return rollout


def _unshard_cp(values: torch.Tensor, ctx) -> torch.Tensor:
    """Undo the load-balanced CP split of ``[b, s_local]`` values: all-gather and reorder to ``[b, s]``."""
    if ctx.cp == 1:
        return values
    values = values.to(collective_device(ctx.cp_group))
    parts = [torch.empty_like(values) for _ in range(ctx.cp)]
    dist.all_gather(parts, values.contiguous(), group=ctx.cp_group)
    seq = values.shape[1] * ctx.cp
    positions = torch.cat([context_parallel_chunks(torch.arange(seq).unsqueeze(0), ctx.cp, r).squeeze(0)
                           for r in range(ctx.cp)])
    full = torch.empty(values.shape[0], seq, dtype=values.dtype)
    full[:, positions] = torch.cat(parts, dim=1).cpu()
    return full


def compute_old_logprobs(runner, rollout: Rollout) -> None:
    """Behaviour log-probs (log mu) per ``loss.behaviour``, on every pipeline stage.

    ``recompute``: a forward pass of the trainer's current weights (the sampling weights when the rollout
    is fresh). ``sampler``: the sampler's own per-token log-probs, no forward pass.
    """
    cfg, engine, ctx = runner.config, runner.engine, runner.engine.ctx
    rows = torch.arange(rollout.size)
    micro = micro_batches(rollout, rows, cfg.train.micro_batch_size, ctx)
    if cfg.loss.behaviour == "sampler":
        use_sampler_logprobs(rollout, token_level=cfg.loss.name != "vespo")
        if cfg.rl.mismatch_metrics:
            rollout.trainer_logprob_sums = _logprob_sums(runner, micro, engine.chunks)
        if engine.reference_chunks is not None:
            rollout.ref_logprob_sums = _logprob_sums(runner, micro, engine.reference_chunks)
        return
    temperature, chunk = cfg.rollout.temperature, cfg.loss.chunk_size
    token_level = cfg.loss.name != "vespo"
    head = (old_token_logprobs_head if token_level else old_logprob_sums_head)(ctx, temperature, chunk)
    # MoE routing replay: the sampler's experts when it recorded them (replayed here too, counting the
    # tokens whose own choice differs), else the experts of this behaviour pass.
    recorder = routing_recorder(engine) if cfg.rollout.routing_replay else None
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
    seq_len = cfg.seq_length
    if token_level:
        local = torch.zeros(rollout.size, seq_len // ctx.cp)
        if reports:
            local = torch.cat([r["tok/logprobs"].view(-1, seq_len // ctx.cp) for r in reports]).cpu()
        values = _unshard_cp(local, ctx)
    else:
        values = torch.zeros(rollout.size)
        if reports:
            values = torch.cat([r["seq/logprob_sum"] for r in reports]).cpu()
    values = _from_last_stage(values, ctx)
    if token_level:
        rollout.old_token_logprobs = values
        rollout.old_logprob_sums = (values * rollout.response_token_mask()[:, 1:]).sum(dim=1)
    else:
        rollout.old_logprob_sums = values
    rollout.trainer_logprob_sums = rollout.old_logprob_sums
    if engine.reference_chunks is not None:
        rollout.ref_logprob_sums = _logprob_sums(runner, micro, engine.reference_chunks)


def use_sampler_logprobs(rollout: Rollout, token_level: bool) -> None:
    """Take the sampler's per-token log-probs as the behaviour policy (``loss.behaviour=sampler``)."""
    mask = rollout.response_token_mask()
    rollout.old_logprob_sums = (rollout.sampler_logprobs * mask).sum(dim=1)
    if token_level:
        rollout.old_token_logprobs = (rollout.sampler_logprobs * mask)[:, 1:].contiguous()


def _logprob_sums(runner, micro, chunks) -> torch.Tensor:
    """Per-sequence log-prob sums under ``chunks`` (the trainer's, or the frozen KL reference), on every stage."""
    cfg, engine, ctx = runner.config, runner.engine, runner.engine.ctx
    head = old_logprob_sums_head(ctx, cfg.rollout.temperature, cfg.loss.chunk_size)
    reports = engine.forward_only(micro, head, emit_hidden_states=True, chunks=chunks)
    values = torch.cat([r["seq/logprob_sum"] for r in reports]).cpu() if reports else torch.zeros(
        sum(b["tokens"].shape[0] for b in micro))
    return _from_last_stage(values, ctx)


def _from_last_stage(values: torch.Tensor, ctx) -> torch.Tensor:
    """The last pipeline stage's CPU ``values`` on every stage (a broadcast over PP; as is without PP)."""
    if ctx.pp == 1:
        return values
    buffer = values.contiguous().to(collective_device(ctx.pp_group))
    dist.broadcast(buffer, src=dist.get_global_rank(ctx.pp_group, ctx.pp - 1), group=ctx.pp_group)
    return buffer.cpu()


def _dp_max(values: list[float], ctx) -> list[float]:
    if ctx.dp == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(ctx.dp_group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.dp_group)
    return tensor.tolist()


def mismatch_metrics(rollout: Rollout, ctx) -> dict[str, float]:
    """The trainer's log-probs as the rollout enters training against the sampler's (``mismatch/*``).

    Per sequence, ``d = sum_t (log pi_trainer - log mu_sampler)``: mean and max of ``|d|`` and the k1 estimate
    ``mean(-d)`` of KL(mu || pi_trainer) per sequence; per token the mean and max of ``|log pi_trainer -
    log mu_sampler|`` where the trainer's per-token log-probs exist (token-level losses under recompute).
    With the same weights on both sides (colocated, or disaggregated at lag 0) this is the train/inference
    mismatch alone; with a lag it also holds the policy change. Collective over data-parallel ranks.
    """
    if rollout.trainer_logprob_sums is None:
        return {}
    responded = rollout.response_lengths > 0
    diff = (rollout.trainer_logprob_sums - rollout.sampler_logprob_sums())[responded].double()
    abs_sum, kl_sum, count = _dp_sum([diff.abs().sum().item(), (-diff).sum().item(), float(diff.numel())], ctx)
    local_max = [diff.abs().max().item() if diff.numel() else 0.0]
    metrics = {"mismatch/seq_abs_log_ratio_mean": abs_sum / max(count, 1.0),
               "mismatch/seq_abs_log_ratio_max": _dp_max(local_max, ctx)[0],
               "mismatch/kl_k1_per_seq": kl_sum / max(count, 1.0)}
    if rollout.old_token_logprobs is not None and rollout.trainer_logprob_sums is rollout.old_logprob_sums:
        mask = rollout.response_token_mask()[:, 1:].bool()
        token_diff = (rollout.old_token_logprobs - rollout.sampler_logprobs[:, 1:])[mask].double().abs()
        total, tokens = _dp_sum([token_diff.sum().item(), float(token_diff.numel())], ctx)
        metrics["mismatch/token_abs_log_ratio_mean"] = total / max(tokens, 1.0)
        metrics["mismatch/token_abs_log_ratio_max"] = _dp_max([token_diff.max().item() if token_diff.numel()
                                                               else 0.0], ctx)[0]
    return metrics


def partial_metrics(rollout: Rollout, ctx) -> dict[str, float]:
    """Partial rollouts: how many policy versions the step's sequences span (``partial/*``; collective over DP)."""
    if rollout.token_versions is None:
        return {}
    sampled = rollout.token_versions >= 0
    newest = torch.where(sampled, rollout.token_versions, -1).amax(dim=1)
    oldest = torch.where(sampled, rollout.token_versions, torch.iinfo(torch.long).max).amin(dim=1)
    span = (newest - oldest).clamp(min=0).double()
    mixed, count = _dp_sum([float((span > 0).sum()), float(span.numel())], ctx)
    return {"partial/mixed_sequences_frac": mixed / max(count, 1.0),
            "partial/version_span_max": _dp_max([float(span.max()) if span.numel() else 0.0], ctx)[0]}


def rollout_metrics(rollout: Rollout, ctx) -> dict[str, float]:
    generated = (rollout.generated_lengths if rollout.generated_lengths is not None
                 else rollout.response_lengths).float()
    correct = (rollout.rewards >= 1.0).float()
    sums = _dp_sum([rollout.rewards.sum().item(), correct.sum().item(), generated.sum().item(),
                    float(rollout.size)], ctx)
    metrics = mismatch_metrics(rollout, ctx) | partial_metrics(rollout, ctx)
    if rollout.routing_mismatch_frac is not None:  # already reduced over all ranks
        metrics["rollout/routing_mismatch_frac"] = float(rollout.routing_mismatch_frac)
    if rollout.ref_logprob_sums is not None:
        kl_sum, tokens = _dp_sum([(rollout.old_logprob_sums - rollout.ref_logprob_sums).sum().item(),
                                  rollout.response_lengths.sum().item()], ctx)
        metrics["kl/ref_k1_per_token"] = kl_sum / max(tokens, 1.0)
    return metrics | {
        "reward/mean": sums[0] / sums[3],
        "reward/accuracy": sums[1] / sums[3],
        "response/length_mean": sums[2] / sums[3],
        "response/tokens": sums[2],
    }


def rollout_minibatches(rollout: Rollout, config, step: int) -> list[torch.Tensor]:
    """This step's mini-batch rows: contiguous whole groups, in a per-step order with ``rl.shuffle_groups``."""
    return minibatch_rows(rollout.size, config.rollout.group_size, config.rl.num_minibatches,
                          config.rl.shuffle_groups, seed=config.train.seed + 7919 * step)


def train_on_rollout(runner, rollout: Rollout, step: int) -> list:
    """One optimizer update per mini-batch; returns the engine's step results."""
    cfg, engine, ctx = runner.config, runner.engine, runner.engine.ctx
    recorder = routing_recorder(engine)  # MoE: per-expert load counts, and replay of recorded experts
    results = []
    for update, rows in enumerate(rollout_minibatches(rollout, cfg, step)):
        label = f"RL step {step}, update {update}"
        lengths = rollout.response_lengths[rows]
        tokens, sequences = _dp_sum([lengths.sum().item(), (lengths > 0).sum().item()], ctx)
        global_tokens = torch.tensor(max(tokens, 1.0))
        global_sequences = torch.tensor(max(sequences, 1.0))
        micro = micro_batches(rollout, rows, cfg.train.micro_batch_size, ctx)
        global_micro = len(micro) * ctx.dp  # every DP rank runs the same number of micro-batches
        if cfg.loss.name == "vespo":
            head = vespo_head(ctx, cfg, global_tokens, global_sequences, global_micro, label)
        else:
            old = rollout.old_token_logprobs
            for batch, chunk in zip(micro, rows.split(cfg.train.micro_batch_size)):
                batch["old_logprobs"] = context_parallel_chunks(old[chunk], ctx.cp, ctx.cp_rank)
            head = token_loss_head(ctx, cfg, global_tokens, global_sequences, global_micro, label)
        with recorder.training_pass(micro) if recorder is not None else nullcontext():
            results.append(engine.train_step(micro, head, emit_hidden_states=True))
    return results

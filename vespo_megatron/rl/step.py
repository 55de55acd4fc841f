"""One RL step, as a straight line: rollout -> rewards -> advantages -> old log-probs -> N updates -> metrics.

:func:`run_step` takes the step's rollout (sampled here when colocated, received from the workers when
disaggregated, taken from the vLLM servers with ``rollout.engine=vllm``, or read from a JSONL file), makes it
trainable (:mod:`vespo_megatron.rl.behaviour`: group
advantages and the behaviour log-probs mu of the weights that sampled it), then :func:`train_on_rollout`
splits it into ``rl.num_minibatches`` mini-batches of whole groups (contiguous; ``rl.shuffle_groups``
permutes the groups first) and applies one optimizer update per mini-batch: the first sees ``log W = 0``
(on-policy when K = 0), later ones an increasingly stale behaviour policy.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from vespo_megatron.config import Config
from vespo_megatron.models.routing import routing_load_metrics, routing_recorder
from vespo_megatron.rl.batch import Rollout, config_micro_batches, minibatch_rows
from vespo_megatron.rl.behaviour import finish_rollout, update_logprob_sums, update_measures_mismatch
from vespo_megatron.rl.context import RLContext
from vespo_megatron.rl.heads import token_loss_head, vespo_head
from vespo_megatron.rl.remote import RemoteRollouts, to_rollout
from vespo_megatron.rl.sampling import rollout_generator, sample_and_score
from vespo_megatron.rl.served import ServedRollouts, served_to_rows
from vespo_megatron.rl.state import LoopState
from vespo_megatron.rl.step_metrics import mismatch_metrics, phi_metrics, rollout_metrics
from vespo_megatron.runtime.collectives import data_parallel_rows, data_parallel_share, sum_over
from vespo_megatron.tasks.base import Sample
from vespo_megatron.train.engine import Engine, StepResult


# ------------------------------------------------------------------------------------- the rollout


def sample_rollout(context: RLContext, step: int, prompts: list[Sample], version: int) -> Rollout:
    """This rank's ``prompts``, ``group_size`` responses each, sampled with the current weights and scored."""
    config, engine = context.config, context.engine
    engine.gather_params()  # the decoder reads parameters outside DDP's forward hooks (lean step)
    generated, rewards = sample_and_score(engine, config, context.tokenizer, context.task, prompts,
                                          rollout_generator(config, step, context.parallel.dp_rank))
    return finish_rollout(config, engine, generated.sequences, generated.prompt_lengths, generated.response_lengths,
                          generated.sampler_logprobs, rewards, version, routing_indices=generated.routing_indices,
                          step_index=step)


def read_external_rollout(context: RLContext, state: LoopState, version: int) -> Rollout:
    """This DP rank's groups from the external JSONL (every rank reads the file, takes its share)."""
    config, ctx = context.config, context.parallel
    batch = state.external.next_groups(config.rollout.prompts_per_step)
    rows = data_parallel_rows(batch.sequences.shape[0], ctx.dp, ctx.dp_rank)
    return finish_rollout(config, context.engine, batch.sequences[rows], batch.prompt_lengths[rows],
                          batch.response_lengths[rows], batch.sampler_logprobs[rows], batch.rewards[rows], version,
                          step_index=state.step)


def next_local_rollout(context: RLContext, state: LoopState) -> Rollout:
    """Colocated: this step's rollout, sampled by this rank (or read from the external file)."""
    version = context.engine.iteration
    if state.external is not None:
        return read_external_rollout(context, state, version)
    prompts = state.prompts.next_batch(context.config.rollout.prompts_per_step)
    mine = data_parallel_share(prompts, context.parallel.dp, context.parallel.dp_rank)
    return sample_rollout(context, state.step, mine, version)


def admitted_remote_rollout(context: RLContext, state: LoopState, link: RemoteRollouts) -> tuple[Rollout, float]:
    """Disaggregated: the next rollout the staleness bound admits (drops are reported to the workers), and
    the seconds spent waiting for it."""
    waited = 0.0
    while True:
        started = time.perf_counter()
        fields = link.next_fields()
        waited += time.perf_counter() - started
        # every trainer rank decides alike: versions and sizes are the same on all of them
        if state.staleness.admit(fields["version"], context.engine.iteration, fields["sequences"].shape[0]):
            return to_rollout(context.config, context.engine, fields), waited
        link.step_done(link.next_index - 1)


def admitted_served_rollout(context: RLContext, state: LoopState, served: ServedRollouts) -> tuple[Rollout, float]:
    """rollout.engine=vllm: the next served step the staleness bound admits (each rank its data-parallel rows),
    and the seconds spent waiting for it."""
    ctx, waited = context.parallel, 0.0
    while True:
        started = time.perf_counter()
        fields = served.take(state)
        waited += time.perf_counter() - started
        # every rank decides alike: the version and size come from rank 0's broadcast
        if state.staleness.admit(fields["version"], context.engine.iteration, fields["sequences"].shape[0]):
            return to_rollout(context.config, context.engine, served_to_rows(fields, ctx.dp, ctx.dp_rank)), waited


# ------------------------------------------------------------------------------------- the updates


def rollout_minibatches(rollout: Rollout, config: Config, step: int) -> list[torch.Tensor]:
    """This step's mini-batch rows: contiguous whole groups, in a per-step order with ``rl.shuffle_groups``."""
    return minibatch_rows(rollout.size, config.rollout.group_size, config.rl.num_minibatches,
                          config.rl.shuffle_groups, seed=config.train.seed + 7919 * step)


def train_on_rollout(config: Config, engine: Engine, rollout: Rollout, step: int) -> list[StepResult]:
    """One optimizer update per mini-batch; returns the engine's step results."""
    ctx = engine.ctx
    recorder = routing_recorder(engine)  # MoE: per-expert load counts, and replay of recorded experts
    results = []
    for update, rows in enumerate(rollout_minibatches(rollout, config, step)):
        label = f"RL step {step}, update {update}"
        lengths = rollout.response_lengths[rows]
        tokens, sequences = sum_over([lengths.sum().item(), (lengths > 0).sum().item()], ctx.dp_group)
        global_tokens = torch.tensor(max(tokens, 1.0))
        global_sequences = torch.tensor(max(sequences, 1.0))
        micro = config_micro_batches(config, rollout, rows, ctx)  # token-level losses: with old_logprobs
        global_micro = len(micro) * ctx.dp  # every DP rank runs the same number of micro-batches
        if config.loss.name == "vespo":
            head = vespo_head(ctx, config, global_tokens, global_sequences, global_micro, label)
        else:
            head = token_loss_head(ctx, config, global_tokens, global_sequences, global_micro, label)
        with recorder.training_pass(micro) if recorder is not None else nullcontext():
            results.append(engine.train_step(micro, head, emit_hidden_states=True))
    return results


# ------------------------------------------------------------------------------------- the step


def run_step(context: RLContext, state: LoopState, link: Optional[RemoteRollouts] = None,
             stop_requested: Optional[Callable[[], bool]] = None,
             served: Optional[ServedRollouts] = None) -> Optional[dict]:
    """RL step ``state.step``; returns its metrics (None while the colocated async queue is still filling).

    Disaggregated (``link`` given), the step ends by telling the workers it is done (with a weight push when
    due); ``state.stopping`` is set when it is the last one (``train.steps`` reached or ``stop_requested()``).
    With ``served`` (rollout.engine=vllm) the step's responses come from the vLLM servers; after the updates
    the weights are pushed when ``rl.sync_every`` updates have passed, and the next steps are issued.
    """
    config, engine, ctx = context.config, context.engine, context.parallel
    started = time.perf_counter()
    if link is not None:
        rollout, waited = admitted_remote_rollout(context, state, link)
        metrics = rollout_metrics(rollout, ctx)
        metrics["time/rollout"] = waited
    elif served is not None:
        rollout, waited = admitted_served_rollout(context, state, served)
        metrics = rollout_metrics(rollout, ctx)
        metrics["time/rollout"] = waited
    else:
        state.queue.append(next_local_rollout(context, state))
        sampled = time.perf_counter()
        metrics = rollout_metrics(state.queue[-1], ctx)
        metrics["time/rollout"] = sampled - started
        if len(state.queue) <= config.rl.async_lag:
            return None
        rollout = state.queue.pop(0)
        state.staleness.admit(rollout.behaviour_version, engine.iteration, rollout.size)
    version_before = engine.iteration
    results = train_on_rollout(config, engine, rollout, state.step)
    finished = time.perf_counter()
    if rollout.trainer_logprob_sums is None and config.rl.mismatch_metrics and update_measures_mismatch(config, engine):
        rollout.trainer_logprob_sums = update_logprob_sums(results[0].reported, rollout.size, engine)
        metrics.update(mismatch_metrics(rollout, ctx))
    rows_per_update = rollout.size // config.rl.num_minibatches * ctx.dp
    for update in range(len(results)):
        state.staleness.record_update(rollout.behaviour_version, version_before + update, rows_per_update)
    metrics["loss/value"] = sum(r.metrics.get("loss/value", 0.0) for r in results) / len(results)
    norms = [r.grad_norm for r in results if r.grad_norm is not None]
    metrics["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    metrics["lr"] = results[-1].lr
    metrics["train/skipped_updates"] = float(sum(r.skipped for r in results))  # non-finite gradients: no update
    metrics["staleness/policy_lag"] = float(version_before - rollout.behaviour_version)
    metrics["rl/step_index"] = float(rollout.step_index)  # the RL step whose prompts this update trained on
    metrics.update(state.staleness.step_metrics())
    metrics["time/train"] = sum(r.seconds["forward_backward"] for r in results)
    metrics["time/optimizer"] = sum(r.seconds["optimizer"] for r in results)
    if link is not None:
        state.stopping = state.step + 1 >= config.train.steps or bool(stop_requested and stop_requested())
        sync = link.step_done(link.next_index - 1, stop=state.stopping)
        metrics["time/sync"] = sync["sync/seconds"]
        metrics["sync/bytes"] = sync["sync/bytes"]
        finished = time.perf_counter()
    if served is not None:
        if served.push_due():
            push = served.push()
            metrics["time/sync"] = push.seconds
            metrics.update(push.metrics())
        served.issue(state, steps_done=state.step + 1)  # the next steps go out while the metrics are reduced
        finished = time.perf_counter()
    metrics["time/step"] = finished - started
    metrics["throughput/tokens_per_s"] = metrics["response/tokens"] / max(finished - started, 1e-9)
    metrics.update(phi_metrics(results, ctx))
    metrics.update(routing_load_metrics(engine))  # MoE per-expert load (collective; {} when dense)
    for name in results[0].metrics:
        if name.endswith("_frac"):
            metrics[name] = sum(r.metrics[name] for r in results) / len(results)
    return metrics

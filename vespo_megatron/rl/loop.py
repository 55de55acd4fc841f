"""The RL run: set-up, optional supervised warm-up, the step loop, metrics, checkpoints, resume.

``run(config)`` is what ``vespo-megatron train`` calls on every rank (under torchrun or srun).
Colocated (the default), every rank samples then trains. The loop can keep a queue of rollouts to
simulate asynchronous training faithfully: at every step one rollout is sampled with the current
weights (and its old-policy log-probs computed with those same weights), and the oldest rollout in the
queue is trained on once the queue holds more than ``rl.async_lag`` of them. With
``parallel.rollout_ranks > 0`` (disaggregated, :mod:`vespo_megatron.rl.workers`) the rollout ranks run
:func:`_run_rollout_worker` and the trainer ranks take their steps from the workers. Either way the
:class:`~vespo_megatron.rl.staleness.StalenessManager` admits each rollout and counts its staleness.
The queue (or the steps the workers sampled ahead), the prompt stream position and the step are
checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from vespo_megatron.config import Config, config_to_dict
from vespo_megatron.models.routing import routing_load_metrics
from vespo_megatron.rl.batch import Rollout
from vespo_megatron.rl.step import (
    read_external_rollout,
    rollout_metrics,
    sample_rollout,
    score,
    train_on_rollout,
)
from vespo_megatron.runtime.distributed import initialize
from vespo_megatron.train.batches import causal_lm_batch, shard_micro_batch
from vespo_megatron.train.engine import Engine, build_engine
from vespo_megatron.train.sft import sft_loss_head


@dataclass
class Runner:
    """Everything a rank needs for the RL loop."""

    config: Config
    engine: Engine
    tokenizer: object
    task: object
    prompts: object
    external: object = None
    remote: object = None
    """Disaggregated mode: the trainer's link to the rollout workers (:class:`vespo_megatron.rl.workers.RemoteRollouts`)."""
    staleness: object = None
    """The :class:`vespo_megatron.rl.staleness.StalenessManager` that admits rollouts and counts staleness."""
    split: object = None
    queue: list = field(default_factory=list)
    step: int = 0
    stop_requested: object = None
    """Disaggregated mode: a callable polled before each step's header (preemption), set by :func:`run`."""
    stopping: bool = False
    history: list = field(default_factory=list)
    eval_before: Optional[float] = None
    eval_after: Optional[float] = None


def build_runner(config: Config, hf_weights: bool = True) -> Runner:
    """Tokenizer, task, groups and engine (a rollout worker's in disaggregated mode); ``hf_weights=False``
    skips loading ``model.hf_path``'s weights (the run is about to resume from a checkpoint)."""
    from vespo_megatron.rl.staleness import StalenessManager
    from vespo_megatron.rollout.external import ExternalRollouts
    from vespo_megatron.tasks import build_task
    from vespo_megatron.tokenizer import load_run_tokenizer

    tokenizer = load_run_tokenizer(config)
    task = build_task(config.task.name, **config.task.options)
    split = None
    if config.parallel.rollout_ranks:
        from vespo_megatron.rl.workers import RolloutWorker
        from vespo_megatron.runtime.distributed import initialize_disaggregated

        ctx, split = initialize_disaggregated(config)
        if split.role == "rollout":
            worker = RolloutWorker(config, ctx, split, tokenizer, task, trainer_dp=config.parallel.dp(
                len(split.trainer_ranks) + len(split.rollout_ranks)))
            return Runner(config=config, engine=worker.engine, tokenizer=tokenizer, task=task, prompts=None,
                          remote=worker, split=split)
    else:
        ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=tokenizer.vocab_size, hf_weights=hf_weights)
    external = None
    if config.rollout.source == "jsonl":
        external = ExternalRollouts(config.rollout.jsonl_path, group_size=config.rollout.group_size,
                                    seq_length=config.seq_length, pad_id=tokenizer.pad_id,
                                    vocab_size=tokenizer.vocab_size)
    staleness = StalenessManager(config.rl.max_staleness, config.rl.num_minibatches)
    runner = Runner(config=config, engine=engine, tokenizer=tokenizer, task=task, prompts=task.prompts(),
                    external=external, staleness=staleness, split=split)
    if split is not None:
        from vespo_megatron.rl.workers import RemoteRollouts

        runner.remote = RemoteRollouts(runner, split)  # exchanges the weight-sync plan with the workers
    return runner


# ------------------------------------------------------------------------------------------ warm-up


def _sft_micro_batches(runner: Runner, samples) -> list[dict]:
    tok, seq_len = runner.tokenizer, runner.config.seq_length
    rows, masks = [], []
    for sample in samples:
        prompt = tok.encode_prompt(sample.prompt)
        answer = tok.encode(sample.answer) + [tok.eos_id]
        ids = (prompt + answer)[: seq_len + 1]
        row = torch.full((seq_len + 1,), tok.pad_id, dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(seq_len + 1, dtype=torch.long)
        mask[len(prompt) : len(ids)] = 1
        rows.append(row)
        masks.append(mask)
    sequences, mask = torch.stack(rows), torch.stack(masks)
    mbs = runner.config.train.micro_batch_size
    return [shard_micro_batch(causal_lm_batch(s, m), runner.engine.ctx)
            for s, m in zip(sequences.split(mbs), mask.split(mbs))]


def supervised_warmup(runner: Runner, steps: int) -> list[float]:
    """``steps`` cross-entropy updates on the task's reference answers; returns the losses."""
    cfg, ctx = runner.config, runner.engine.ctx
    per_rank = cfg.train.global_batch_size // ctx.dp
    warm = runner.task.prompts()  # an independent stream: the RL prompt position is untouched
    losses = []
    for _ in range(steps):
        samples = warm.next_batch(cfg.train.global_batch_size)[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
        result = runner.engine.train_step(_sft_micro_batches(runner, samples), sft_loss_head,
                                          lr=cfg.rl.sft_lr or cfg.optimizer.lr)
        losses.append(result.metrics["sft/loss"])
    return losses


def evaluate(runner: Runner, num_prompts: int, seed_offset: int = 10_000) -> float:
    """Greedy accuracy on ``num_prompts`` held-out prompts (same on every rank)."""
    from dataclasses import replace

    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decoders import sample

    cfg = runner.config
    runner.engine.gather_params()  # the decoder reads parameters outside DDP's forward hooks (lean step)
    samples = runner.task.held_out(seed_offset).prompts().next_batch(num_prompts)
    encoded = [runner.tokenizer.encode_prompt(s.prompt) for s in samples]
    micro = 1 if not cfg.parallel.vpp else cfg.parallel.pp
    while len(encoded) % micro:
        encoded.append(encoded[-1])
        samples.append(samples[-1])
    generated = sample(runner.engine, encoded, DecodeRequest(
        replace(cfg.rollout), seq_length=cfg.seq_length, eos_id=runner.tokenizer.stop_ids,
        pad_id=runner.tokenizer.pad_id, generator=torch.Generator().manual_seed(0), greedy=True,
        vocab_size=runner.tokenizer.vocab_size))
    rewards = score(runner.task, runner.tokenizer, generated, samples)[:num_prompts]
    return float((rewards >= 1.0).float().mean())


# --------------------------------------------------------------------------------------------- loop


def _next_rollout(runner: Runner) -> Rollout:
    cfg, ctx = runner.config, runner.engine.ctx
    version = runner.engine.iteration
    if runner.external is not None:
        return read_external_rollout(runner, version)
    prompts = runner.prompts.next_batch(cfg.rollout.prompts_per_step)
    per_rank = cfg.rollout.prompts_per_step // ctx.dp
    mine = prompts[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    return sample_rollout(runner, runner.step, mine, version)


def _phi_metrics(results, ctx) -> dict[str, float]:
    """Step-level loss diagnostics from the per-sequence vectors of every micro-batch and DP rank."""
    import torch.distributed as dist

    from vespo_megatron.loss.metrics import effective_sample_size

    if not ctx.is_last_stage:
        return {}
    vectors: dict[str, list] = {}
    for result in results:
        for report in result.reported:
            for key, value in report.items():
                if key.startswith("seq/"):
                    vectors.setdefault(key, []).append(value)
    local = {k: torch.cat(v).cpu() for k, v in vectors.items()}
    if ctx.dp > 1:
        gathered = [None] * ctx.dp
        dist.all_gather_object(gathered, local, group=ctx.dp_group)
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


def _admitted_remote_rollout(runner: Runner) -> tuple[Rollout, float]:
    """Disaggregated mode: the next rollout the staleness bound admits (drops are reported to the workers)."""
    from vespo_megatron.rl.workers import to_rollout

    waited = 0.0
    while True:
        started = time.perf_counter()
        fields = runner.remote.next_fields()
        waited += time.perf_counter() - started
        index = runner.remote.next_index - 1
        # every trainer rank decides alike: versions and sizes are the same on all of them
        if runner.staleness.admit(fields["version"], runner.engine.iteration, fields["sequences"].shape[0]):
            return to_rollout(runner, fields), waited
        runner.remote.step_done(index)


def run_step(runner: Runner) -> Optional[dict]:
    """One RL step; returns its metrics (None while the async queue is still filling)."""
    cfg = runner.config
    started = time.perf_counter()
    if runner.remote is not None:
        rollout, waited = _admitted_remote_rollout(runner)
        metrics = rollout_metrics(rollout, runner.engine.ctx)
        metrics["time/rollout"] = waited
    else:
        runner.queue.append(_next_rollout(runner))
        sampled = time.perf_counter()
        fresh = runner.queue[-1]
        metrics = rollout_metrics(fresh, runner.engine.ctx)
        metrics["time/rollout"] = sampled - started
        if len(runner.queue) <= cfg.rl.async_lag:
            return None
        rollout = runner.queue.pop(0)
        runner.staleness.admit(rollout.behaviour_version, runner.engine.iteration, rollout.size)
    version_before = runner.engine.iteration
    results = train_on_rollout(runner, rollout, runner.step)
    finished = time.perf_counter()
    rows_per_update = rollout.size // cfg.rl.num_minibatches * runner.engine.ctx.dp
    for update in range(len(results)):
        runner.staleness.record_update(rollout.behaviour_version, version_before + update, rows_per_update)
    metrics["loss/value"] = sum(r.metrics.get("loss/value", 0.0) for r in results) / len(results)
    norms = [r.grad_norm for r in results if r.grad_norm is not None]
    metrics["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    metrics["lr"] = results[-1].lr
    metrics["train/skipped_updates"] = float(sum(r.skipped for r in results))  # non-finite gradients: no update
    metrics["staleness/policy_lag"] = float(version_before - rollout.behaviour_version)
    metrics["rl/step_index"] = float(rollout.step_index)  # the RL step whose prompts this update trained on
    metrics.update(runner.staleness.step_metrics())
    metrics["time/train"] = sum(r.seconds["forward_backward"] for r in results)
    metrics["time/optimizer"] = sum(r.seconds["optimizer"] for r in results)
    if runner.remote is not None:
        runner.stopping = runner.step + 1 >= cfg.train.steps or bool(runner.stop_requested and runner.stop_requested())
        sync = runner.remote.step_done(runner.remote.next_index - 1, stop=runner.stopping)
        metrics["time/sync"] = sync["sync/seconds"]
        metrics["sync/bytes"] = sync["sync/bytes"]
        finished = time.perf_counter()
    metrics["time/step"] = finished - started
    metrics["throughput/tokens_per_s"] = metrics["response/tokens"] / max(finished - started, 1e-9)
    metrics.update(_phi_metrics(results, runner.engine.ctx))
    metrics.update(routing_load_metrics(runner.engine))  # MoE per-expert load (collective; {} when dense)
    for name in results[0].metrics:
        if name.endswith("_frac"):
            metrics[name] = sum(r.metrics[name] for r in results) / len(results)
    return metrics


def loop_state(runner: Runner) -> dict:
    state = {"step": runner.step, "queue": [r.state_dict() for r in runner.queue],
             "history": list(runner.history)}
    state["prompts"] = runner.prompts.state_dict()
    if runner.external is not None:
        state["external"] = runner.external.state_dict()
    state["staleness"] = runner.staleness.state_dict()
    if runner.remote is not None:
        state["remote"] = runner.remote.state_dict()
    return state


def load_loop_state(runner: Runner, state: dict) -> None:
    runner.step = int(state["step"])
    runner.queue = [Rollout.from_state_dict(r) for r in state["queue"]]
    runner.history = list(state.get("history", []))
    runner.prompts.load_state_dict(state["prompts"])
    if runner.external is not None and "external" in state:
        runner.external.load_state_dict(state["external"])
    if "staleness" in state:
        runner.staleness.load_state_dict(state["staleness"])
    if runner.remote is not None and "remote" in state:
        runner.remote.load_state_dict(state["remote"])


def _announce_start(runner: Runner, step: int) -> int:
    """Trainer rank 0 tells every rank the RL step the workers start sampling at (0, or after a resume)."""
    import torch.distributed as dist

    value = torch.tensor([step], dtype=torch.int64)
    dist.broadcast(value, src=runner.split.trainer_ranks[0], group=runner.split.control_group)
    return int(value.item())


def _run_rollout_worker(runner: Runner) -> Runner:
    """A rollout rank's whole run: wait for the start, then sample until the trainer says stop."""
    worker = runner.remote
    worker.fast_forward(_announce_start(runner, 0))
    runner.step = worker.run()
    return runner


def run(config: Config) -> Runner:
    """The whole RL run on this rank: resume or warm up, then ``train.steps`` RL steps."""
    from vespo_megatron import checkpoint
    from vespo_megatron.metrics import MetricsLogger, ProgressBar

    ckpt_cfg = config.checkpoint
    resume_from = checkpoint.latest_checkpoint(ckpt_cfg.dir) if ckpt_cfg.dir and ckpt_cfg.resume else None
    runner = build_runner(config, hf_weights=resume_from is None)
    if runner.split is not None and runner.split.role == "rollout":
        return _run_rollout_worker(runner)
    ctx = runner.engine.ctx
    if config.model.hf_path and ckpt_cfg.dir:
        from vespo_megatron.models.hf import write_checkpoint_sidecar

        write_checkpoint_sidecar(ckpt_cfg.dir, config)  # export-hf reads the HF config back from here
    if resume_from is not None:
        if config.rl.kl_coef > 0:
            runner.engine.freeze_reference()  # the checkpoint restores the reference weights into it
        load_loop_state(runner, checkpoint.load_checkpoint(runner.engine, resume_from))
        if ctx.is_logging_rank:
            print(f"resumed from {resume_from} at step {runner.step}", flush=True)
    else:
        if config.rl.sft_warmup_steps:
            supervised_warmup(runner, config.rl.sft_warmup_steps)
        if config.rl.kl_coef > 0:
            runner.engine.freeze_reference()  # the policy as RL starts
    if config.rl.eval_prompts:
        runner.eval_before = evaluate(runner, config.rl.eval_prompts)
    preemption = checkpoint.install_preemption_handler()
    logger = MetricsLogger(config.logging.run_dir, enabled=ctx.is_logging_rank, tensorboard=config.logging.tensorboard,
                           wandb_project=config.logging.wandb_project, config_dict=config_to_dict(config),
                           resume=resume_from is not None)
    if resume_from is not None:
        logger.truncate_after(runner.step)
    progress = ProgressBar(config.train.steps, enabled=ctx.is_logging_rank and config.logging.progress_bar,
                           initial=runner.step)
    trainer_group = runner.split.trainer_group if runner.split is not None else None
    if runner.remote is not None:
        _announce_start(runner, runner.remote.next_index + len(runner.remote.buffer))
        runner.remote.start()
        runner.stop_requested = lambda: preemption.should_stop(trainer_group)
    try:
        while runner.step < config.train.steps:
            metrics = run_step(runner)
            runner.step += 1
            if metrics is not None:
                runner.history.append(metrics["reward/mean"])
                if runner.step % config.logging.log_every == 0:
                    logger.log(runner.step, metrics)
                progress.update(runner.step, metrics)
            stop = runner.stopping if runner.remote is not None else preemption.should_stop(None)
            periodic = ckpt_cfg.save_every and runner.step % ckpt_cfg.save_every == 0
            saving = ckpt_cfg.dir and (periodic or stop or runner.step == config.train.steps)
            if runner.remote is not None and (saving or stop or runner.step == config.train.steps):
                runner.remote.drain()  # the steps the workers sampled ahead go into the checkpoint
            if saving:
                checkpoint.save_checkpoint(runner.engine, ckpt_cfg.dir, runner.step, loop_state(runner))
            if ckpt_cfg.export_hf_every and runner.step % ckpt_cfg.export_hf_every == 0:
                from vespo_megatron.models.hf import export_checkpoint

                export_checkpoint(runner.engine, ckpt_cfg.dir, f"{ckpt_cfg.dir}/hf/step_{runner.step:08d}")
            if stop:
                break
        if config.rl.eval_prompts:
            runner.eval_after = evaluate(runner, config.rl.eval_prompts)
            logger.log(runner.step, {"eval/accuracy_before": runner.eval_before, "eval/accuracy": runner.eval_after})
    finally:
        progress.close()
        logger.close()
    return runner

"""The RL run: set-up, optional supervised warm-up, the step loop, metrics, checkpoints, resume.

``run(config)`` is what ``vespo-megatron train`` calls on every rank (under torchrun or srun).
Colocated (the default), every rank samples then trains. The loop can keep a queue of rollouts to
simulate asynchronous training faithfully: at every step one rollout is sampled with the current
weights (and its old-policy log-probs computed with those same weights), and the oldest rollout in the
queue is trained on once the queue holds more than ``rl.async_lag`` of them. With
``parallel.rollout_ranks > 0`` (disaggregated) the rollout ranks run a
:class:`~vespo_megatron.rl.worker.RolloutWorker` and the trainer ranks take their steps from the workers
through a :class:`~vespo_megatron.rl.remote.RemoteRollouts` link. With ``rollout.engine=vllm`` the steps come
from vLLM servers through a :class:`~vespo_megatron.rl.served.ServedRollouts` link. Either way the
:class:`~vespo_megatron.rl.staleness.StalenessManager` admits each rollout and counts its staleness.
The loop state (:class:`~vespo_megatron.rl.state.LoopState`), the steps the workers sampled ahead and the
step are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from vespo_megatron import checkpoint
from vespo_megatron.checkpoint.sidecar import export_checkpoint, write_checkpoint_sidecar
from vespo_megatron.config import Config, config_to_dict
from vespo_megatron.metrics import MetricsLogger, ProgressBar
from vespo_megatron.rl.context import RLContext
from vespo_megatron.rl.evaluation import evaluate
from vespo_megatron.rl.remote import RemoteRollouts
from vespo_megatron.rl.served import ServedRollouts
from vespo_megatron.rl.staleness import StalenessManager
from vespo_megatron.rl.state import LoopState
from vespo_megatron.rl.step import run_step
from vespo_megatron.rl.warmup import supervised_warmup
from vespo_megatron.rl.worker import RolloutWorker
from vespo_megatron.rollout.decode_step import decode_path
from vespo_megatron.rollout.external import ExternalRollouts
from vespo_megatron.runtime.distributed import JobSplit, ParallelContext, initialize, initialize_disaggregated
from vespo_megatron.runtime.preemption import install_preemption_handler
from vespo_megatron.tasks import build_task
from vespo_megatron.tokenizer import load_run_tokenizer
from vespo_megatron.train.engine import build_engine


@dataclass
class TrainerRun:
    """A trainer rank's run (every rank when colocated): its context, its loop state, its link to the workers."""

    context: RLContext
    state: LoopState
    link: Optional[RemoteRollouts] = None
    """Disaggregated mode only: the steps sampled by the rollout workers come in, headers and weights go out."""
    split: Optional[JobSplit] = None
    served: Optional[ServedRollouts] = None
    """rollout.engine=vllm only: the vLLM servers, the steps issued to them and the version they hold."""
    eval_before: Optional[float] = None
    eval_after: Optional[float] = None
    role = "trainer"


@dataclass
class WorkerRun:
    """A rollout rank's run (disaggregated mode): its worker and the RL steps it stepped through."""

    worker: RolloutWorker
    split: JobSplit
    steps: int = 0
    role = "rollout"


def build_trainer(config: Config, hf_weights: bool = True, ctx: Optional[ParallelContext] = None,
                  split: Optional[JobSplit] = None) -> TrainerRun:
    """Tokenizer, task, engine and a fresh loop state for a trainer rank; ``hf_weights=False`` skips loading
    ``model.hf_path``'s weights (the run is about to resume from a checkpoint). Colocated runs initialise
    the process groups here; disaggregated runs pass the trainer's ``ctx`` and ``split`` (:func:`build_run`)."""
    tokenizer = load_run_tokenizer(config)
    task = build_task(config.task.name, **config.task.options)
    if ctx is None:
        ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=tokenizer.vocab_size, hf_weights=hf_weights)
    external = None
    if config.rollout.source == "jsonl":
        external = ExternalRollouts(config.rollout.jsonl_path, group_size=config.rollout.group_size,
                                    seq_length=config.seq_length, pad_id=tokenizer.pad_id,
                                    vocab_size=tokenizer.vocab_size)
    context = RLContext(config=config, engine=engine, tokenizer=tokenizer, task=task)
    state = LoopState(prompts=task.prompts(), staleness=StalenessManager(config.rl.max_staleness,
                                                                         config.rl.num_minibatches),
                      external=external)
    # disaggregated: exchanges the weight-sync plan with the workers
    link = RemoteRollouts(config, engine, split) if split is not None else None
    served = ServedRollouts.open(context) if config.rollout.engine == "vllm" else None
    return TrainerRun(context=context, state=state, link=link, split=split, served=served)


def build_run(config: Config, hf_weights: bool = True) -> Union[TrainerRun, WorkerRun]:
    """This rank's side of the run: a :class:`TrainerRun`, or a :class:`WorkerRun` on a rollout rank."""
    if not config.parallel.rollout_ranks:
        return build_trainer(config, hf_weights)
    ctx, split = initialize_disaggregated(config)
    if split.role == "trainer":
        return build_trainer(config, hf_weights, ctx=ctx, split=split)
    tokenizer = load_run_tokenizer(config)
    task = build_task(config.task.name, **config.task.options)
    trainer_dp = config.parallel.dp(len(split.trainer_ranks) + len(split.rollout_ranks))
    return WorkerRun(worker=RolloutWorker(config, ctx, split, tokenizer, task, trainer_dp=trainer_dp), split=split)


def checkpoint_state(run: TrainerRun) -> dict:
    """What a checkpoint stores beside the weights: the loop state and the workers' sampled-ahead steps."""
    state = run.state.state_dict()
    if run.link is not None:
        state["remote"] = run.link.state_dict()
    if run.served is not None:
        run.served.drain()  # the steps in flight go into the checkpoint
        state["served"] = run.served.state_dict()
    return state


def load_checkpoint_state(run: TrainerRun, state: dict) -> None:
    run.state.load_state_dict(state)
    if run.link is not None and "remote" in state:
        run.link.load_state_dict(state["remote"])
    if run.served is not None and "served" in state:
        run.served.load_state_dict(state["served"])


def _announce_start(split: JobSplit, step: int) -> int:
    """Trainer rank 0 tells every rank the RL step the workers start sampling at (0, or after a resume)."""
    value = torch.tensor([step], dtype=torch.int64)
    dist.broadcast(value, src=split.trainer_ranks[0], group=split.control_group)
    return int(value.item())


def _run_rollout_worker(run: WorkerRun) -> WorkerRun:
    """A rollout rank's whole run: wait for the start, then sample until the trainer says stop."""
    run.worker.fast_forward(_announce_start(run.split, 0))
    run.steps = run.worker.run()
    return run


def run(config: Config) -> Union[TrainerRun, WorkerRun]:
    """The whole RL run on this rank: resume or warm up, then ``train.steps`` RL steps."""
    ckpt_cfg = config.checkpoint
    resume_from = checkpoint.latest_checkpoint(ckpt_cfg.dir) if ckpt_cfg.dir and ckpt_cfg.resume else None
    built = build_run(config, hf_weights=resume_from is None)
    if isinstance(built, WorkerRun):
        return _run_rollout_worker(built)
    context, state, link = built.context, built.state, built.link
    engine, ctx = context.engine, context.parallel
    if config.model.hf_path and ckpt_cfg.dir:
        write_checkpoint_sidecar(ckpt_cfg.dir, config)  # export-hf reads the HF config back from here
    if resume_from is not None:
        if config.rl.kl_coef > 0:
            engine.freeze_reference()  # the checkpoint restores the reference weights into it
        load_checkpoint_state(built, checkpoint.load_checkpoint(engine, resume_from))
        if ctx.is_logging_rank:
            print(f"resumed from {resume_from} at step {state.step}", flush=True)
    else:
        if config.rl.sft_warmup_steps:
            supervised_warmup(context, config.rl.sft_warmup_steps)
        if config.rl.kl_coef > 0:
            engine.freeze_reference()  # the policy as RL starts
    if config.rl.eval_prompts:
        built.eval_before = evaluate(context, config.rl.eval_prompts)
    preemption = install_preemption_handler()
    logger = MetricsLogger(config.logging.run_dir, enabled=ctx.is_logging_rank, tensorboard=config.logging.tensorboard,
                           wandb_project=config.logging.wandb_project, config_dict=config_to_dict(config),
                           resume=resume_from is not None)
    if resume_from is not None:
        logger.truncate_after(state.step)
    served = built.served
    if link is None and served is None and config.rollout.source == "model":  # this rank samples: record how
        if config.rollout.engine == "kv" and ctx.cp == 1:
            path, why = decode_path(engine, config.rollout.kv_step)
        else:
            path, why = "recompute", f"rollout.engine={config.rollout.engine}, parallel.cp={ctx.cp}"
        logger.record_run_info(decode_path=path, decode_path_reason=why)
    progress = ProgressBar(config.train.steps, enabled=ctx.is_logging_rank and config.logging.progress_bar,
                           initial=state.step)
    stop_requested = None
    if link is not None:
        _announce_start(built.split, link.next_index + len(link.buffer))
        link.start()
        stop_requested = lambda: preemption.should_stop(built.split.trainer_group)  # noqa: E731
    try:
        if served is not None:
            served.push()  # the servers start from model.hf_path: give them the weights the run starts with
            served.issue(state, steps_done=state.step)
        while state.step < config.train.steps:
            metrics = run_step(context, state, link, stop_requested, served=served)
            state.step += 1
            if metrics is not None:
                state.history.append(metrics["reward/mean"])
                if state.step % config.logging.log_every == 0:
                    logger.log(state.step, metrics)
                progress.update(state.step, metrics)
            stop = state.stopping if link is not None else preemption.should_stop(None)
            periodic = ckpt_cfg.save_every and state.step % ckpt_cfg.save_every == 0
            saving = ckpt_cfg.dir and (periodic or stop or state.step == config.train.steps)
            if link is not None and (saving or stop or state.step == config.train.steps):
                link.drain()  # the steps the workers sampled ahead go into the checkpoint
            if saving:
                checkpoint.save_checkpoint(engine, ckpt_cfg.dir, state.step, checkpoint_state(built))
            if ckpt_cfg.export_hf_every and state.step % ckpt_cfg.export_hf_every == 0:
                export_checkpoint(engine, ckpt_cfg.dir, f"{ckpt_cfg.dir}/hf/step_{state.step:08d}")
            if stop:
                break
        if config.rl.eval_prompts:
            built.eval_after = evaluate(context, config.rl.eval_prompts)
            logger.log(state.step, {"eval/accuracy_before": built.eval_before, "eval/accuracy": built.eval_after})
    finally:
        progress.close()
        logger.close()
        if served is not None:
            served.close()
    return built

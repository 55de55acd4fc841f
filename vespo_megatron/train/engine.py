"""Model + DDP + optimizer + LR schedule, and one training step through Megatron's schedules.

``build_engine`` wraps this rank's model chunks in Megatron ``DistributedDataParallel`` (fp32 gradient
reduction, optional overlap and distributed optimizer), builds Megatron's optimizer (Adam; on CPU
Megatron falls back to ``torch.optim.AdamW`` by itself) and its LR scheduler, and wires the config
hooks the schedules need. ``Engine.train_step`` runs ``get_forward_backward_func`` over a list of
micro-batches (PP/VPP aware), then the optimizer; ``Engine.forward_only`` runs the same schedule
without backward (old-policy and reference log-probs).
"""

from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from vespo_megatron.config import Config
from vespo_megatron.models.gpt import BuiltModel, build_model, count_parameters, unwrap
from vespo_megatron.runtime.collectives import from_last_stage, object_from_last_stage, sum_over
from vespo_megatron.runtime.distributed import ParallelContext
from vespo_megatron.runtime.global_state import reset_megatron_globals
from vespo_megatron.train.megatron_loss import LossHead, make_forward_step


@dataclass
class StepResult:
    """What one optimizer step reports (reduced over micro-batches and data-parallel ranks)."""

    metrics: dict[str, float]
    reported: list[dict]
    """The last stage's raw per-micro-batch reports (empty on other stages)."""
    grad_norm: Optional[float]
    skipped: bool
    lr: float
    seconds: dict[str, float] = field(default_factory=dict)


def _ddp_wrap(config: Config, built: BuiltModel) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    opt = config.optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=opt.overlap_grad_reduce,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        overlap_param_gather=opt.overlap_param_gather,
        check_for_nan_in_grad=True,
    )
    wrapped = []
    for index, chunk in enumerate(built.chunks):
        wrapped.append(
            DistributedDataParallel(
                config=built.tconfig,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets start reducing during backward (Megatron's rule).
                disable_bucketing=index > 0,
            )
        )
    return wrapped


def _optimizer(config: Config, chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = config.optimizer
    bf16 = config.model.dtype == "bf16"
    mconfig = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        overlap_param_gather=opt.overlap_param_gather,
    )
    return get_megatron_optimizer(mconfig, chunks, use_gloo_process_groups=False)


def total_updates(config: Config) -> int:
    """Optimizer updates of the RL run (``train.steps`` rollouts x ``rl.num_minibatches``): the schedule's length."""
    return config.train.steps * config.rl.num_minibatches


def _scheduler(config: Config, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = config.optimizer
    steps = max(total_updates(config), 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_steps,
        lr_decay_steps=max(steps, opt.lr_warmup_steps + 1),
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def _wire_model_config(built: BuiltModel, chunks: list, optimizer_config) -> None:
    from megatron.core.distributed import finalize_model_grads

    tconfig = built.tconfig
    tconfig.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if optimizer_config.overlap_param_gather and optimizer_config.use_distributed_optimizer:
        starts = [chunk.start_param_sync for chunk in chunks]
        tconfig.param_sync_func = starts[0] if len(starts) == 1 else starts


@dataclass
class Engine:
    """Everything one rank needs to train: parallel context, DDP chunks, optimizer, scheduler."""

    config: Config
    ctx: ParallelContext
    built: BuiltModel
    chunks: list
    optimizer: Any
    scheduler: Any
    iteration: int = 0
    reference_chunks: Optional[list] = None
    """Frozen copy of the policy for the KL penalty (``rl.kl_coef > 0``); see :meth:`freeze_reference`."""

    @property
    def num_parameters_local(self) -> int:
        return count_parameters(self.chunks)

    def restart_schedule(self, lr: Optional[float] = None) -> None:
        """Start the learning-rate schedule afresh at the next update, peaking at ``lr`` (default optimizer.lr).

        A checkpoint restores the schedule it was saved with (Megatron keeps the checkpoint's lr over the
        config's), and Megatron's optimizer only loads Adam state into parameter groups of the same lr. A
        run that takes a checkpoint's weights and Adam state as its starting point, like every cell of the
        staleness study, builds with the checkpoint's lr, loads, then calls this with its own lr.
        """
        config = self.config
        if lr is not None:
            config = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, lr=lr))
            for group in self.optimizer.param_groups:  # Megatron's scheduler prefers a group's own peak lr
                if "max_lr" in group:
                    group["max_lr"] = lr
        self.scheduler = _scheduler(config, self.optimizer)

    @property
    def gathers_params_lazily(self) -> bool:
        """True when an update leaves parameters to be all-gathered by the next forward pass
        (``optimizer.overlap_param_gather`` with the distributed optimizer)."""
        opt = self.config.optimizer
        return bool(self.optimizer is not None and opt.overlap_param_gather and opt.use_distributed_optimizer)

    def gather_params(self) -> None:
        """Make every rank's parameters the optimizer's latest values, before they leave the optimizer.

        With ``overlap_param_gather`` Megatron's distributed optimizer does not all-gather the updated
        parameter shards in ``step()``; DDP's forward pre-hooks finish the gather lazily, module by
        module, during the next forward. Anything that reads parameters outside such a forward (a weight
        push, an HF export, a checkpoint, the frozen KL reference, the lean decode step) calls this
        first. It is Megatron's own forced sync, the one its training loop runs before evaluation and
        checkpointing: ``optimizer.prepare_model_params_for_param_sync()`` then
        ``DistributedDataParallel.start_param_sync(force_sync=True)`` on every chunk, which waits for any
        all-gather in flight and runs a synchronous one. A collective over the data-parallel group: every
        trainer rank calls it. A no-op without lazy gathers.
        """
        if not self.gathers_params_lazily:
            return
        self.optimizer.prepare_model_params_for_param_sync()
        for chunk in self.chunks:
            chunk.start_param_sync(force_sync=True)

    def freeze_reference(self) -> None:
        """Snapshot the current weights into frozen, gradient-free model chunks (the KL reference)."""
        self.gather_params()
        reference = build_model(self.config, self.built.padded_vocab_size).chunks
        for ref, live in zip(reference, self.chunks):
            unwrap(ref).load_state_dict(unwrap(live).state_dict())
            ref.eval()
            for param in ref.parameters():
                param.requires_grad_(False)
        self.reference_chunks = reference

    def _run_schedule(self, micro_batches: list[dict], loss_head: LossHead, forward_only: bool,
                      emit_hidden_states: bool, chunks: Optional[list] = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        forward_backward = get_forward_backward_func()
        chunks = self.chunks if chunks is None else chunks
        iterators = [iter(micro_batches) for _ in chunks]
        seq_length = micro_batches[0]["tokens"].shape[1] * self.ctx.cp
        return forward_backward(
            forward_step_func=make_forward_step(loss_head, emit_hidden_states),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    def train_step(self, micro_batches: list[dict], loss_head: LossHead, emit_hidden_states: bool = False,
                   lr: Optional[float] = None) -> StepResult:
        """Forward/backward over ``micro_batches`` (this rank's share), then one optimizer step.

        ``lr`` overrides the schedule for this step (supervised warm-up) and leaves the schedule as it is;
        without it the schedule's current learning rate is re-applied first, so an override never leaks
        into the next scheduled update. ``StepResult.lr`` is the rate this update used.
        """
        if lr is None:
            self.scheduler.step(increment=0)  # sets every group's lr from the schedule at this update
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        used_lr = float(self.optimizer.param_groups[0]["lr"])
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        started = time.perf_counter()
        reported = self.forward_backward(micro_batches, loss_head, emit_hidden_states)
        backward_done = time.perf_counter()
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok and lr is None:
            self.scheduler.step(increment=1)
            self.iteration += 1
        finished = time.perf_counter()
        return StepResult(
            metrics=self.reduce_reported(reported),
            reported=reported,
            grad_norm=None if grad_norm is None else float(grad_norm),
            skipped=not update_ok,
            lr=used_lr,
            seconds={"forward_backward": backward_done - started, "optimizer": finished - backward_done},
        )

    def forward_backward(self, micro_batches: list[dict], loss_head: LossHead, emit_hidden_states: bool = False
                         ) -> list[dict]:
        """The schedule with backward (gradients accumulate into the DDP buffers and are finalised)."""
        self.scale_moe_aux_loss(micro_batches)
        return self._run_schedule(micro_batches, loss_head, forward_only=False, emit_hidden_states=emit_hidden_states)

    def scale_moe_aux_loss(self, micro_batches: list[dict]) -> None:
        """Set the routers' aux-loss coefficient for this update so its effective value is the configured one.

        With per-token loss scaling, Megatron's router multiplies each micro-batch's load-balancing loss
        by the tokens it routes and expects ``finalize_model_grads`` to divide by the same count, which
        leaves the aux gradient as the mean over the update's micro-batches (and DP ranks) of each
        micro-batch's aux-loss gradient. Our loss heads return loss tokens (response or answer tokens)
        instead, so the division is by ``N_loss`` and the aux gradient comes out ``routed / N_loss`` times
        too large. The coefficient is therefore scaled by ``N_loss / routed`` (both over the whole update:
        all micro-batches, all DP x CP ranks). No other layout factor is needed: the router pre-multiplies
        by its local tokens times the TP x CP size, i.e. the micro-batch's routed tokens, on every layout
        (tests/dist/test_moe_aux_loss.py checks the gradient against float64 on 1 process, TP2+SP, CP2, EP2).
        """
        model = self.config.model
        if not model.is_moe:
            return
        if model.moe_aux_loss_coeff == 0:
            self.built.tconfig.moe_aux_loss_coeff = 0.0
            return
        # micro-batches may differ in shape (token budget, packing): count each one's routed positions
        loss_tokens, routed = sum_over([sum(float(b["loss_mask"].sum()) for b in micro_batches),
                                        sum(b["tokens"].numel() for b in micro_batches)], self.ctx.dp_cp_group)
        self.built.tconfig.moe_aux_loss_coeff = model.moe_aux_loss_coeff * max(float(loss_tokens), 1.0) / routed

    def close(self) -> None:
        """Release what this engine left in Megatron's process-wide state (MoE trackers, aux-loss scales)."""
        reset_megatron_globals()

    def forward_only(self, micro_batches: list[dict], loss_head: LossHead, emit_hidden_states: bool = True,
                     chunks: Optional[list] = None) -> list[dict]:
        """Run the schedule without backward; returns the last stage's per-micro-batch reports.

        ``chunks`` runs other model chunks of the same layout (the frozen KL reference) instead of the policy's.
        """
        with torch.no_grad():
            return self._run_schedule(micro_batches, loss_head, forward_only=True,
                                      emit_hidden_states=emit_hidden_states, chunks=chunks)

    def reduce_reported(self, reported: list[dict]) -> dict[str, float]:
        """Sum each reported ``[value, count]`` pair over micro-batches and DP x CP ranks; return value / count.

        Per-sequence (``seq/*``) and per-token (``tok/*``) vectors are left to the caller. Reports live on
        the last pipeline stage; they are broadcast to the whole pipeline so every
        rank returns the same metrics.
        """
        names = sorted(k for k in reported[0] if not k.startswith(("seq/", "tok/"))) if reported else []
        names = object_from_last_stage(names, self.ctx.pp_group)
        totals = torch.zeros(len(names), 2, dtype=torch.float64)
        for item in reported:
            for row, name in enumerate(names):
                pair = item[name].detach().to(device="cpu", dtype=torch.float64)
                totals[row] += pair if pair.numel() == 2 else torch.stack(
                    [pair.sum(), torch.ones((), dtype=torch.float64)])
        totals = from_last_stage(totals, self.ctx.pp_group)
        totals = torch.tensor(sum_over(totals.flatten().tolist(), self.ctx.dp_cp_group)).view(-1, 2)
        return {name: float(totals[row, 0] / max(totals[row, 1], 1e-12)) for row, name in enumerate(names)}


def build_engine(config: Config, ctx: ParallelContext, vocab_size: int, hf_weights: bool = True) -> Engine:
    """Model chunks for this rank, wrapped for data parallelism, with optimizer and LR schedule.

    Megatron's process-wide state left by an earlier engine in this process is cleared first
    (runtime/global_state.py), so engines built one after another behave as in a fresh process. With
    ``model.hf_path`` set and ``hf_weights`` true the chunks start from that folder's weights
    (:func:`vespo_megatron.models.hf.load_hf_weights`); a run about to resume passes False.
    """
    reset_megatron_globals()
    built = build_model(config, vocab_size)
    if config.model.hf_path and hf_weights:
        from vespo_megatron.models.hf import load_hf_weights

        load_hf_weights(config.model.hf_path, built.chunks)
    chunks = _ddp_wrap(config, built)
    optimizer = _optimizer(config, chunks)
    _wire_model_config(built, chunks, config.optimizer)
    scheduler = _scheduler(config, optimizer)
    return Engine(config=config, ctx=ctx, built=built, chunks=chunks, optimizer=optimizer, scheduler=scheduler)

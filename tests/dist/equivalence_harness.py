"""Sharded-vs-unsharded comparison of one training step through the whole Megatron stack.

The step is either supervised cross entropy (``head="sft"``) or one RL update with a policy loss head
(``head="vespo"``: the sequence-parallel VESPO path; ``head="grpo"``: the per-token path), so the
loss heads are checked through Megatron's schedules, DDP, pipeline and micro-batching too.

The reference is a one-process run (tp=pp=cp=ep=dp=1). Both runs start from the same weights: the
reference saves them with dist-checkpointing and the sharded layout loads them (Megatron reshards).
Gradients and post-step weights of the sharded run are brought back to full shape the same way: the
sharded run saves them as a dist checkpoint and a one-process model loads it.
"""

from __future__ import annotations

import os

import torch

from vespo_megatron.config import load_config
from vespo_megatron.runtime.local_workers import run_local_workers

DENSE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "model.max_seq_length=16", "model.vocab_size=64",
    "train.micro_batch_size=2", "train.global_batch_size=8", "optimizer.lr=0.001", "optimizer.clip_grad=0.0",
    "optimizer.adam_eps=0.0001",  # a smooth first Adam step: lr * g / (|g| + eps) is stable for tiny g
]  # fmt: skip
MOE = DENSE + ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32"]
SEQ_LEN = 16
NUM_MICRO_BATCHES = 4


def micro_batches(seed: int = 7) -> list[dict]:
    """The global batch of the step: NUM_MICRO_BATCHES micro-batches of 2 sequences."""
    from vespo_megatron.train.batches import causal_lm_batch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MICRO_BATCHES):
        seqs = torch.randint(0, 64, (2, SEQ_LEN + 1), generator=gen)
        mask = (torch.rand(2, SEQ_LEN + 1, generator=gen) > 0.3).long()
        batches.append(causal_lm_batch(seqs, mask))
    return batches


def synthetic_rollout(seed: int = 11):
    """8 sequences with random prompts/responses, sampler log-probs and advantages (no old log-probs yet)."""
    from vespo_megatron.rl.batch import Rollout

    gen = torch.Generator().manual_seed(seed)
    n = 2 * NUM_MICRO_BATCHES
    prompt_lengths = torch.randint(2, 6, (n,), generator=gen)
    response_lengths = torch.randint(3, 9, (n,), generator=gen)
    response_lengths[3] = 1
    sequences = torch.randint(0, 64, (n, SEQ_LEN + 1), generator=gen)
    sampler = -torch.rand(n, SEQ_LEN + 1, generator=gen) * 3
    return Rollout(
        sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=response_lengths,
        sampler_logprobs=sampler, rewards=torch.zeros(n), advantages=torch.randn(n, generator=gen),
    )


def _rl_micro_batches(engine, ctx, config, head_kind, workdir, role):
    """This rank's RL micro-batches (as ``config.train`` sets them: fixed size, token budget or packed) and
    the update's loss head; the reference fixes the old log-probs."""
    from vespo_megatron.rl.batch import config_micro_batches
    from vespo_megatron.rl.behaviour import per_row
    from vespo_megatron.rl.heads import old_logprob_sums_head, old_token_logprobs_head, token_loss_head, vespo_head

    rollout = synthetic_rollout()
    old_path = os.path.join(workdir, "old_logprobs.pt")
    if role == "reference":
        micro = config_micro_batches(config, rollout, torch.arange(rollout.size), ctx)
        gen = torch.Generator().manual_seed(5)
        if head_kind == "vespo":
            reports = engine.forward_only(micro, old_logprob_sums_head(ctx, 1.0, 4))
            old = per_row(micro, reports, "seq/logprob_sum", rollout.size)
            old = old + 0.5 * torch.randn(old.shape, generator=gen)  # a stale behaviour policy
        else:
            reports = engine.forward_only(micro, old_token_logprobs_head(ctx, 1.0, 4))
            old = torch.cat([r["tok/logprobs"].view(-1, SEQ_LEN) for r in reports])
            old = old + 0.2 * torch.randn(old.shape, generator=gen)
        torch.save(old, old_path)
    old = torch.load(old_path)
    per_rank = rollout.size // ctx.dp
    rows = torch.arange(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    global_tokens = rollout.response_lengths.sum().float()
    global_sequences = torch.tensor(float(rollout.size))
    if head_kind == "vespo":
        rollout.old_logprob_sums = old
    else:
        rollout.old_token_logprobs = old
    micro = config_micro_batches(config, rollout, rows, ctx)
    global_micro = len(micro) * ctx.dp
    head = vespo_head if head_kind == "vespo" else token_loss_head
    return micro, head(ctx, config, global_tokens, global_sequences, global_micro)


def logprob_sums_by_row(engine, ctx, micro: list[dict]) -> torch.Tensor:
    """Per-sequence log-prob sums of this rank's ``micro`` under the current weights, in rollout-row order
    (every row of the rollout; rows of other DP ranks are 0), on every pipeline stage."""
    from vespo_megatron.rl.behaviour import per_row
    from vespo_megatron.rl.heads import old_logprob_sums_head
    from vespo_megatron.runtime.collectives import from_last_stage

    reports = engine.forward_only(micro, old_logprob_sums_head(ctx, 1.0, 4))
    return from_last_stage(per_row(micro, reports, "seq/logprob_sum", 2 * NUM_MICRO_BATCHES), ctx.pp_group)


def _sharded_state(engine):
    return {f"model{i}": _unwrapped(chunk).sharded_state_dict() for i, chunk in enumerate(engine.chunks)}


def _unwrapped(chunk):
    from vespo_megatron.models.gpt import unwrap

    return unwrap(chunk)


def _save(engine, directory):
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state(engine), directory)


def _load(engine, directory):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state(engine), directory)
    for i, chunk in enumerate(engine.chunks):
        _unwrapped(chunk).load_state_dict(state[f"model{i}"])


def _full_params(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in _unwrapped(engine.chunks[0]).named_parameters()}


def _swap_grads_into_params(engine):
    """Replace every parameter's data by its reduced gradient; return the saved data to restore."""
    saved = []
    for chunk in engine.chunks:
        for param in chunk.parameters():
            saved.append(param.data.clone())
            param.data.copy_(param.main_grad)
    return saved


def _restore(engine, saved):
    params = [p for chunk in engine.chunks for p in chunk.parameters()]
    for param, data in zip(params, saved):
        param.data.copy_(data)


def _my_micro_batches(ctx) -> list[dict]:
    from vespo_megatron.train.batches import shard_micro_batch

    batches = micro_batches()
    per_rank = len(batches) // ctx.dp
    mine = batches[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    return [shard_micro_batch(b, ctx) for b in mine]


def _step_worker(rank, world, overrides, workdir, role, compare_grads, head_kind="sft", report_sums=False):
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine
    from vespo_megatron.train.sft import sft_loss_head

    config = load_config(None, overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=64)
    if role == "reference":
        _save(engine, os.path.join(workdir, "init"))
    else:
        _load(engine, os.path.join(workdir, "init"))
    for chunk in engine.chunks:
        chunk.zero_grad_buffer()
    if head_kind == "sft":
        micro, head, emit, key = _my_micro_batches(ctx), sft_loss_head, False, "sft/loss"
    else:
        (micro, head), emit, key = _rl_micro_batches(engine, ctx, config, head_kind, workdir, role), True, "loss/value"
    sums = logprob_sums_by_row(engine, ctx, micro) if report_sums else None
    reported = engine.forward_backward(micro, head, emit)
    loss = engine.reduce_reported(reported)[key]
    if compare_grads:
        saved = _swap_grads_into_params(engine)
        _save(engine, os.path.join(workdir, f"{role}_grads"))
        _restore(engine, saved)
    update_ok, _, _ = engine.optimizer.step()
    assert update_ok
    _save(engine, os.path.join(workdir, f"{role}_weights"))
    primary = ctx.tp_rank == 0 and ctx.cp_rank == 0 and ctx.pp_rank == 0  # one per data-parallel replica
    return dict(loss=loss, sums=sums, micro_batches=len(micro), primary=primary) if report_sums else loss


def _read_worker(rank, world, overrides, directories):
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, overrides)
    engine = build_engine(config, initialize(config), vocab_size=64)
    full = []
    for directory in directories:
        _load(engine, directory)
        full.append(_full_params(engine))
    return full


def compare_layout(base: list[str], layout: list[str], world: int, workdir: str, compare_grads: bool = True,
                   head: str = "sft", report_sums: bool = False):
    """Run reference and sharded steps; return (ref_loss, loss, {kind: (ref, sharded) full param dicts}).

    With ``report_sums`` (RL heads) each loss is a dict ``{loss, sums, micro_batches}``: ``sums`` the
    per-sequence log-prob sums of the rank's rows before the update (rollout-row order, 0 for other DP
    ranks' rows), ``micro_batches`` how many the rank ran, ``primary`` true on one rank per DP replica."""
    ref_loss = run_local_workers(_step_worker, 1, base, workdir, "reference", compare_grads, head, report_sums)[0]
    losses = run_local_workers(_step_worker, world, base + layout, workdir, "sharded", compare_grads, head,
                               report_sums)
    kinds = (["grads"] if compare_grads else []) + ["weights"]
    directories = [os.path.join(workdir, f"{role}_{kind}") for kind in kinds for role in ("reference", "sharded")]
    loaded = run_local_workers(_read_worker, 1, base, directories)[0]
    full = {kind: (loaded[2 * i], loaded[2 * i + 1]) for i, kind in enumerate(kinds)}
    return ref_loss, losses, full

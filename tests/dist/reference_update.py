"""Whole Megatron RL updates against plain float64 autograd of loss formulas written here.

One launch of WORLD gloo workers runs every case of a model family:

1. Layout ``full`` (tp = pp = cp = ep = 1, dp = WORLD): the initial weights are saved (dist-checkpointing),
   the old-policy log-probs are computed and perturbed (a stale behaviour policy), and every rank builds
   the float64 reference gradient of each case: Megatron's single-process model in float64 gives the
   final hidden states only; the output projection, log-softmax, the loss formula and the aggregation are
   written below in plain torch, independent of ``vespo_megatron.loss`` and ``rl.heads``.
2. Each sharded layout in turn (parallel_state rebuilt over the same WORLD processes; data parallelism
   fills the rest): load the weights, and for each case one forward/backward through the real
   ``Engine.forward_backward`` (schedule, loss head, loss scaling, grad finalisation, DP/CP reduction)
   with the update's global normalisers, then the reduced gradients are saved as a dist checkpoint
   (with the distributed optimizer, the reduce-scattered buckets are all-gathered first).
3. Layout ``full`` again: each saved gradient is loaded back to full shape and compared with the
   reference.

The batch is 8 sequences (4 prompts x 2 responses) in micro-batches of 2 consecutive rows, so every
layout sees the same micro-batches (``micro-token-mean`` depends on them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

WORLD = 4
SEQ_LEN = 16
ROWS = 8
MICRO = 2
VOCAB = 64
BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "model.max_seq_length=16", "model.vocab_size=64",
    f"train.micro_batch_size={MICRO}", "optimizer.lr=0.001", "optimizer.clip_grad=0.0",
    "rollout.prompts_per_step=4", "rollout.group_size=2", "loss.chunk_size=4",
]  # fmt: skip
MOE_MODEL = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
             "model.moe_aux_loss_coeff=0.0"]
AGGREGATIONS = ("token-mean", "micro-token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass(frozen=True)
class Case:
    """One update: a loss with its options, as config overrides."""

    name: str
    loss: str
    aggregation: str
    extra: tuple = ()

    def overrides(self) -> list[str]:
        return [f"loss.name={self.loss}", f"loss.aggregation={self.aggregation}", *self.extra]

    @property
    def kl_coef(self) -> float:
        return next((float(o.split("=")[1]) for o in self.extra if o.startswith("rl.kl_coef=")), 0.0)

    def option(self, key: str, default):
        return next((type(default)(o.split("=")[1]) for o in self.extra if o.startswith(key + "=")), default)


# ------------------------------------------------------------------------------------------ the batch


def rollout():
    """8 sequences with prompts, responses of different lengths, sampler log-probs and advantages."""
    from vespo_megatron.rl.batch import Rollout

    gen = torch.Generator().manual_seed(11)
    prompt_lengths = torch.randint(2, 6, (ROWS,), generator=gen)
    response_lengths = torch.randint(3, 10, (ROWS,), generator=gen)
    response_lengths[3] = 1
    sequences = torch.randint(0, VOCAB, (ROWS, SEQ_LEN + 1), generator=gen)
    sampler = -torch.rand(ROWS, SEQ_LEN + 1, generator=gen) * 3
    return Rollout(sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=response_lengths,
                   sampler_logprobs=sampler, rewards=torch.zeros(ROWS), advantages=torch.randn(ROWS, generator=gen))


def _response_mask(ro) -> torch.Tensor:
    """[ROWS, SEQ_LEN] 1 where label t (token t+1) is a response token."""
    return ro.response_token_mask()[:, 1:].double()


# ------------------------------------------------------------------------------- the float64 reference


def _phi(log_w, adv, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    k = torch.where(adv >= 0, torch.full_like(adv, k_pos), torch.full_like(adv, k_neg))
    lam = torch.where(adv >= 0, torch.full_like(adv, lam_pos), torch.full_like(adv, lam_neg))
    w = torch.exp(log_w)
    return w**k * torch.exp(lam * (1.0 - w))


def _sequence_correction(case: Case, old_sum, sampler_sum):
    """(log term, keep) per sequence for loss.correction at level sequence."""
    mode = case.option("loss.correction.mode", "none")
    d = old_sum - sampler_sum
    if mode == "tis":
        return torch.minimum(d, torch.log(torch.tensor(case.option("loss.correction.tis_threshold", 2.0),
                                                         dtype=d.dtype))), torch.ones_like(d)
    if mode == "mis":
        keep = ((torch.exp(d) >= case.option("loss.correction.mis_lower", 0.5))
                & (torch.exp(d) <= case.option("loss.correction.mis_upper", 2.0))).double()
        return d * keep, keep
    return torch.zeros_like(d), torch.ones_like(d)


def _token_losses(case: Case, lp, old, adv, mask):
    """[ROWS, SEQ_LEN] token losses of the baselines (docs/loss.md, Baselines), float64."""
    a = adv.unsqueeze(1)
    ratio = torch.exp(lp - old)
    if case.loss == "grpo":
        eps, c = 0.2, 3.0
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
        return torch.where(a < 0, torch.minimum(loss, c * a.abs()), loss)
    if case.loss == "gspo":
        lengths = mask.sum(1, keepdim=True).clamp(min=1)
        s = torch.exp(((lp - old) * mask).sum(1, keepdim=True) / lengths)
        s_tok = s.detach() * torch.exp(lp - lp.detach())
        return torch.maximum(-a * s_tok, -a * s_tok.clamp(1 - 3e-4, 1 + 4e-4))
    if case.loss == "sapo":
        tau = torch.where(a > 0, torch.full_like(a, 1.0), torch.full_like(a, 1.05))
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    if case.loss == "cispo":
        return -ratio.clamp(0.0, 1.28).detach() * a * lp
    raise ValueError(case.loss)


def _aggregate(mode: str, seq_loss, lengths, n_micro: int):
    kept = (lengths > 0).double()
    if mode == "token-mean":
        return seq_loss.sum() / lengths.sum()
    if mode == "seq-mean-token-sum":
        return seq_loss.sum() / kept.sum()
    if mode == "seq-mean-token-mean":
        return (seq_loss / lengths.clamp(min=1)).sum() / kept.sum()
    parts = [(seq_loss[r].sum() / lengths[r].sum().clamp(min=1)) for r in torch.arange(ROWS).split(MICRO)]
    return torch.stack(parts).sum() / n_micro


def reference_loss(case: Case, lp, ro, old_tok, old_sum, ref_sum):
    """The update's scalar loss in float64 from per-label log-probs ``lp`` [ROWS, SEQ_LEN]."""
    mask = _response_mask(ro)
    lengths = mask.sum(1)
    adv = ro.advantages.double()
    sampler_sum = (ro.sampler_logprobs[:, 1:].double() * mask).sum(1)
    seq_lp = (lp * mask).sum(1)
    if case.loss == "vespo":
        term, keep = _sequence_correction(case, old_sum, sampler_sum)
        log_w = (seq_lp.detach() - old_sum + term).clamp(-20, 20)
        seq_loss = -(_phi(log_w, adv) * keep).detach() * adv * seq_lp
    else:
        tok = _token_losses(case, lp, old_tok, adv, mask)
        term, keep = _sequence_correction(case, (old_tok * mask).sum(1), sampler_sum)
        weight = (torch.exp(term) * keep).unsqueeze(1)
        seq_loss = (tok * weight * mask).sum(1)
    if case.kl_coef:
        seq_loss = seq_loss + case.kl_coef * (seq_lp.detach() - ref_sum) * seq_lp
    return _aggregate(case.aggregation, seq_loss, lengths, ROWS // MICRO)


def _float64_logprobs(model, ro):
    """Per-label log-probs [ROWS, SEQ_LEN] of the float64 single-process model (hidden states -> here)."""
    hidden = model(ro.sequences[:, :-1], torch.arange(SEQ_LEN).unsqueeze(0).expand(ROWS, -1), None)  # [s, b, h]
    logits = hidden.transpose(0, 1) @ model.output_weight().t()
    return torch.log_softmax(logits, dim=-1).gather(-1, ro.sequences[:, 1:].unsqueeze(-1)).squeeze(-1)


def reference_gradients(model, case: Case, ro, old_tok, old_sum, ref_sum) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = reference_loss(case, _float64_logprobs(model, ro), ro, old_tok, old_sum, ref_sum)
    loss.backward()
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}, float(loss)


# ------------------------------------------------------------------------------------- the workers


def _config(overrides):
    from vespo_megatron.config import load_config

    return load_config(None, overrides)


def _sharded(chunks):
    from vespo_megatron.models.gpt import unwrap

    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _save(chunks, directory):
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded(chunks), directory)


def _load(chunks, directory):
    from megatron.core import dist_checkpointing

    from vespo_megatron.models.gpt import unwrap

    state = dist_checkpointing.load(_sharded(chunks), directory)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state[f"model{i}"])


def _gather_distributed_optimizer_grads(chunk):
    """All-gather the reduce-scattered grad buckets so every rank holds the full reduced gradients."""
    import torch.distributed as dist

    for group in list(chunk.bucket_groups) + list(chunk.expert_parallel_bucket_groups):
        comm = group.intra_distributed_optimizer_instance_group
        size, rank = comm.size(), comm.rank()
        for bucket in group.buckets:
            shards = bucket.grad_data.view(size, -1)
            parts = [torch.empty_like(shards[0]) for _ in range(size)]
            dist.all_gather(parts, shards[rank].clone(), group=comm)
            bucket.grad_data.copy_(torch.cat(parts))


def _with_sampler(setup_rollout):
    fresh = rollout()
    fresh.sampler_logprobs = setup_rollout.sampler_logprobs.clone()
    return fresh


def _heads(case_config, ctx, ro, old_tok, old_sum, ref_sum, rows):
    from vespo_megatron.rl.batch import micro_batches
    from vespo_megatron.rl.heads import token_loss_head, vespo_head
    from vespo_megatron.runtime.collectives import context_parallel_chunks

    mask = _response_mask(ro)
    # VESPO's behaviour sums are their own (perturbed) values; token losses carry the sums of their tokens,
    # as compute_old_logprobs sets them.
    ro.old_logprob_sums = (old_sum if case_config.loss.name == "vespo" else (old_tok * mask).sum(1)).float()
    if case_config.rl.kl_coef > 0:
        ro.ref_logprob_sums = ref_sum.float()
    micro = micro_batches(ro, rows, MICRO, ctx)
    tokens = torch.tensor(float(ro.response_lengths.sum()))
    sequences = torch.tensor(float((ro.response_lengths > 0).sum()))
    if case_config.loss.name == "vespo":
        return micro, vespo_head(ctx, case_config, tokens, sequences, ROWS // MICRO)
    for batch, chunk in zip(micro, rows.split(MICRO)):
        batch["old_logprobs"] = context_parallel_chunks(old_tok[chunk].float(), ctx.cp, ctx.cp_rank)
    return micro, token_loss_head(ctx, case_config, tokens, sequences, ROWS // MICRO)


def _full_setup(overrides, workdir):
    """Layout full: save the weights, compute and perturb old log-probs, build the float64 model."""
    from vespo_megatron.models.gpt import build_model, unwrap
    from vespo_megatron.rl.heads import old_token_logprobs_head
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = _config(overrides)
    ctx = initialize(config)
    engine = build_engine(config, ctx, vocab_size=VOCAB)
    _save(engine.chunks, os.path.join(workdir, "init"))
    ro = rollout()
    from vespo_megatron.rl.batch import micro_batches

    reports = engine.forward_only(micro_batches(ro, torch.arange(ROWS), MICRO, ctx),
                                  old_token_logprobs_head(ctx, 1.0, 4))
    mask = _response_mask(ro)
    exact = torch.cat([r["tok/logprobs"].view(-1, SEQ_LEN) for r in reports]).double() * mask
    gen = torch.Generator().manual_seed(5)
    old_tok = exact + 0.15 * torch.randn(exact.shape, generator=gen, dtype=torch.float64) * mask
    old_sum = (old_tok * mask).sum(1) + 0.3 * torch.randn(ROWS, generator=gen, dtype=torch.float64)
    ref_sum = (exact * mask).sum(1) + 0.2 * torch.randn(ROWS, generator=gen, dtype=torch.float64)
    sampler = old_tok + 0.1 * torch.randn(exact.shape, generator=gen, dtype=torch.float64) * mask
    ro.sampler_logprobs[:, 1:] = sampler.float()  # near the trainer's, so TIS/MIS keep some and cut some
    old_tok, old_sum, ref_sum = old_tok.float().double(), old_sum.float().double(), ref_sum.float().double()
    model = build_model(config, VOCAB).chunks[0]
    model.load_state_dict(unwrap(engine.chunks[0]).state_dict())
    model = model.double()
    unwrap(model).emit_hidden_states = True
    engine.close()
    return model, ro, old_tok, old_sum, ref_sum


def run_family(rank, world, base, layouts, cases, workdir):
    """The worker: references, every layout x case through Megatron, comparison. Returns per-check results.

    ``layouts`` maps a name to its overrides, or to ``(overrides, case names)`` to run only those cases.
    """
    import torch.distributed as dist

    from vespo_megatron.config.errors import ConfigError
    from vespo_megatron.config.validate import validate
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    model, ro, old_tok, old_sum, ref_sum = _full_setup(base, workdir)
    references = {case.name: reference_gradients(model, case, ro, old_tok, old_sum, ref_sum) for case in cases}
    losses = {}
    for layout_name, entry in layouts.items():
        layout, only = entry if isinstance(entry, tuple) else (entry, None)
        config = _config(base + list(layout))
        ctx = initialize(config)
        engine = build_engine(config, ctx, vocab_size=VOCAB)
        _load(engine.chunks, os.path.join(workdir, "init"))
        per_rank = ROWS // ctx.dp
        rows = torch.arange(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
        for case in cases:
            if only is not None and case.name not in only:
                continue
            case_config = _config(base + list(layout) + case.overrides())
            try:
                validate(case_config, world)
            except ConfigError:
                continue  # a combination the config refuses (e.g. GSPO with CP): nothing to compare
            engine.config = case_config  # the head reads loss options from it; the model is unchanged
            micro, head = _heads(case_config, ctx, _with_sampler(ro), old_tok, old_sum, ref_sum, rows)
            for chunk in engine.chunks:
                chunk.zero_grad_buffer()
            reported = engine.forward_backward(micro, head, emit_hidden_states=True)
            losses[(layout_name, case.name)] = engine.reduce_reported(reported)["loss/value"]
            if case_config.optimizer.use_distributed_optimizer:
                for chunk in engine.chunks:
                    _gather_distributed_optimizer_grads(chunk)
            saved = [p.data.clone() for c in engine.chunks for p in c.parameters()]
            for chunk in engine.chunks:
                for p in chunk.parameters():
                    p.data.copy_(p.main_grad)
            _save(engine.chunks, os.path.join(workdir, f"grads_{layout_name}_{case.name}"))
            for p, data in zip([p for c in engine.chunks for p in c.parameters()], saved):
                p.data.copy_(data)
        engine.close()
        dist.barrier()
    config = _config(base)
    engine = build_engine(config, initialize(config), vocab_size=VOCAB)
    from vespo_megatron.models.gpt import unwrap

    results = []
    for layout_name in layouts:
        for case in cases:
            if (layout_name, case.name) not in losses:
                continue
            _load(engine.chunks, os.path.join(workdir, f"grads_{layout_name}_{case.name}"))
            got = dict(unwrap(engine.chunks[0]).named_parameters())
            want, want_loss = references[case.name]
            scale = max(float(g.abs().max()) for g in want.values())
            err = max(float((got[n].double() - want[n]).abs().max()) for n in want)
            results.append({"layout": layout_name, "case": case.name, "max_err": err, "grad_scale": scale,
                            "loss": losses[(layout_name, case.name)], "ref_loss": want_loss})
    engine.close()
    return results if rank == 0 else None

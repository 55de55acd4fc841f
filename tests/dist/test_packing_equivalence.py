"""Packed token-budget micro-batches, sharded, reproduce the unsharded padded RL update exactly.

The reference is the one-process update with today's fixed micro-batches (``train.micro_batch_size=2``
sequences, each padded to the sequence length). The run under test packs the same sequences into
``[1, t]`` rows under a token budget (``train.max_tokens_per_microbatch``, ``train.pack_sequences``), in a
sharded layout: the per-sequence log-prob sums, the loss and every gradient must agree within 1e-6
(fp32; the log-prob sums, of tens of nats, relative), for the dense model (TP1, TP2+SP, PP2, PP2+VPP2, DP2; GRPO's
per-token path at TP2+SP) and the MoE model (TP1, TP2+SP, PP2, PP2+VPP2, EP2). Under VPP every packed row is padded
to the budget, since the interleaved schedule sends activations of one shape. Packing with CP is
refused by validate; at CP2 the token-budget rows are padded per micro-batch instead (VESPO and GRPO).
The aggregation is token-mean, which does not depend on the split
into micro-batches (docs/loss.md); tests/dist/equivalence_harness.py explains how shards are compared.
"""

import pytest

from tests.dist.equivalence_harness import DENSE, MOE, compare_layout
from tests.dist.test_layout_equivalence import _assert_params_close

pytestmark = pytest.mark.slow

RL = ["loss.chunk_size=4", "rollout.prompts_per_step=4", "rollout.group_size=2", "loss.aggregation=token-mean",
      "model.moe_aux_loss_coeff=0.0"]  # fmt: skip
# Padding tokens are routed (and load-balanced) in the padded run only: the aux loss differs by design.
PACKED = ["train.max_tokens_per_microbatch=16", "train.pack_sequences=true"]

LAYOUTS = {
    "dense_vespo_tp1": (DENSE, "vespo", [], 1),
    "dense_vespo_tp2_sp": (DENSE, "vespo", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "dense_vespo_pp2": (DENSE, "vespo", ["parallel.pp=2"], 2),
    # the interleaved schedule: every packed row padded to the budget (one activation shape)
    "dense_vespo_pp2_vpp2": (DENSE, "vespo", ["parallel.pp=2", "parallel.vpp=2"], 2),
    # a budget all 8 sequences fit into: one bin would do, the schedule needs 2 (each gets sequences)
    "dense_vespo_pp2_vpp2_one_bin_budget": (DENSE, "vespo", ["parallel.pp=2", "parallel.vpp=2",
                                                             "train.max_tokens_per_microbatch=128"], 2),
    "dense_vespo_dp2": (DENSE, "vespo", [], 2),
    "dense_grpo_tp2_sp": (DENSE, "grpo", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    # token-budget rows padded per micro-batch (no packing), which context parallelism supports
    "dense_vespo_budget_cp2": (DENSE, "vespo", ["train.pack_sequences=false", "parallel.cp=2"], 2),
    "dense_grpo_budget_cp2": (DENSE, "grpo", ["train.pack_sequences=false", "parallel.cp=2"], 2),
    "moe_vespo_tp1": (MOE, "vespo", [], 1),
    "moe_vespo_tp2_sp": (MOE, "vespo", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "moe_vespo_pp2": (MOE, "vespo", ["parallel.pp=2"], 2),
    "moe_vespo_pp2_vpp2": (MOE, "vespo", ["parallel.pp=2", "parallel.vpp=2"], 2),
    "moe_vespo_ep2": (MOE, "vespo", ["parallel.ep=2"], 2),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_packed_sharded_update_matches_padded_single_process(name, tmp_path):
    model, head, layout, world = LAYOUTS[name]
    base = model + RL + [f"loss.name={head}"]
    ref, runs, full = compare_layout(base, PACKED + layout, world, str(tmp_path), True, head, report_sums=True)
    # CP's attention is another arithmetic (K/V all-gather, mask by position): its loss rounds differently
    loss_tolerance = 5e-6 if "cp2" in name else 1e-6
    for run in runs:
        assert run["loss"] == pytest.approx(ref["loss"], rel=0, abs=loss_tolerance)
    if "vpp2" in name:  # the interleaved schedule runs a multiple of pp micro-batches
        assert all(run["micro_batches"] % 2 == 0 for run in runs), [run["micro_batches"] for run in runs]
    if "one_bin_budget" in name:
        assert all(run["micro_batches"] == 2 for run in runs), [run["micro_batches"] for run in runs]
    covered = sum(run["sums"] for run in runs if run["primary"])  # one rank per data-parallel replica
    # sums of ~30 nats: 1e-6 relative is the fp32 rounding of the summation order
    assert ((covered - ref["sums"]).abs() / ref["sums"].abs().clamp(min=1)).max().item() <= 1e-6
    ref_grads, grads = full["grads"]
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-5, "reference gradients vanished"
    _assert_params_close(ref_grads, grads, "gradients", atol=1e-6)

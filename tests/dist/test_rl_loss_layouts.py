"""The RL loss heads through Megatron's schedules reproduce the one-process update in every layout.

VESPO takes the sequence-parallel path (per-rank partial sums, one [B] all-reduce over TP x CP, the
kernel after it); GRPO the per-token vocabulary-parallel path. Pipeline stages, data parallelism and
micro-batching must not change the loss or a single gradient: the global normaliser is fixed per update
and Megatron's per-token scaling is cancelled exactly (train/megatron_loss.py).
"""

import pytest

from tests.dist.equivalence_harness import DENSE, compare_layout
from tests.dist.test_layout_equivalence import _assert_params_close

pytestmark = pytest.mark.slow

LAYOUTS = {
    "vespo_tp2": ("vespo", ["parallel.tp=2"], 2),
    "vespo_tp2_sp": ("vespo", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "vespo_cp2": ("vespo", ["parallel.cp=2"], 2),
    "vespo_tp2_cp2": ("vespo", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"], 4),
    "vespo_pp2": ("vespo", ["parallel.pp=2"], 2),
    "vespo_dp2": ("vespo", [], 2),
    "vespo_pp2_dp2": ("vespo", ["parallel.pp=2"], 4),
    "grpo_tp2_sp": ("grpo", ["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "grpo_cp2_dp2": ("grpo", ["parallel.cp=2"], 4),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_rl_update_matches_single_process(name, tmp_path):
    head, layout, world = LAYOUTS[name]
    base = DENSE + [f"loss.name={head}", "loss.chunk_size=4", "rollout.prompts_per_step=4",
                    "rollout.group_size=2"]
    ref_loss, losses, full = compare_layout(base, layout, world, str(tmp_path), True, head)
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    ref_grads, grads = full["grads"]
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-5, "reference gradients vanished"
    _assert_params_close(ref_grads, grads, "gradients", atol=2e-6)
    ref_weights, weights = full["weights"]
    _assert_params_close(ref_weights, weights, "weights after one Adam step", atol=1e-5)

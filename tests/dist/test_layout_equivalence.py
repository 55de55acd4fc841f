"""Every parallel layout reproduces the one-process SFT step: loss, every gradient, weights after Adam.

Megatron-Core itself runs here (GPTModel, parallel_state, schedules, DDP, distributed optimizer,
dist-checkpointing) on gloo; see tests/dist/equivalence_harness.py for how shards are compared.
"""

import pytest

from tests.dist.equivalence_harness import DENSE, MOE, compare_layout

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2_sp": (DENSE, ["parallel.tp=2", "parallel.sequence_parallel=true"], 2, True),
    "pp2": (DENSE, ["parallel.pp=2"], 2, True),
    "pp2_vpp2": (DENSE, ["parallel.pp=2", "parallel.vpp=2"], 2, True),
    "dp2_distopt": (DENSE, ["optimizer.use_distributed_optimizer=true"], 2, False),
    "cp2": (DENSE, ["parallel.cp=2"], 2, True),
    "tp2_cp2": (DENSE, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"], 4, True),
    "moe_ep2_alltoall": (MOE, ["parallel.ep=2", "model.moe_token_dispatcher=alltoall"], 2, True),
    "moe_ep2_allgather": (MOE, ["parallel.ep=2", "model.moe_token_dispatcher=allgather"], 2, True),
    "moe_ep2_tp2": (MOE, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"], 4, True),
}


def _assert_params_close(ref: dict, got: dict, what: str, atol: float):
    assert ref.keys() == got.keys()
    for name in ref:
        diff = (ref[name] - got[name]).abs().max().item()
        assert diff <= atol, f"{what} of {name} differ by {diff:.3e} (> {atol:.0e})"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(name, tmp_path):
    base, layout, world, compare_grads = LAYOUTS[name]
    ref_loss, losses, full = compare_layout(base, layout, world, str(tmp_path), compare_grads)
    for loss in losses:
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    if compare_grads:
        ref_grads, grads = full["grads"]
        assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-4, "reference gradients vanished"
        _assert_params_close(ref_grads, grads, "gradients", atol=2e-6)
    ref_weights, weights = full["weights"]
    _assert_params_close(ref_weights, weights, "weights after one Adam step", atol=1e-5)

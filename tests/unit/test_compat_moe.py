"""MoE on CPU: shims P7 (split sizes) and P8 (uneven gathers), and what megatron-core 0.19 fixed itself.

Every shim case runs the unpatched upstream call first and records how it fails, then applies the
shim and records the same call's result (tests/unit/compat_harness.py runs them). Two former shims
are gone with 0.19 and are checked here as upstream behaviour: the router GEMM runs without
Transformer Engine (was P6), and grouped-GEMM experts exist only in Transformer Engine (was P9), so
our layer spec refuses ``model.moe_grouped_gemm=true`` without it.
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.unit.compat_harness import drive, error, result, run_driver


def case_p6_gone(rank, world_size):
    """Upstream's router GEMM, unpatched, against ``x @ w.T`` (no shim applies)."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    gen = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 3, 8, generator=gen)
    weight = torch.randn(4, 8, generator=gen)
    x = inp.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
    (logits * torch.arange(4.0)).sum().backward()
    x_ref = inp.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    ref = x_ref @ w_ref.t()
    (ref * torch.arange(4.0)).sum().backward()
    return {
        "te_general_gemm": moe_utils.te_general_gemm,
        "logits_ok": torch.allclose(logits.detach(), ref.detach()),
        "grads_ok": torch.allclose(x.grad, x_ref.grad) and torch.allclose(w.grad, w_ref.grad),
    }


def case_p7(rank, world_size):
    import torch
    from megatron.core.transformer.moe import token_dispatcher

    from vespo_megatron.runtime import compat

    tokens = torch.arange(6.0).view(3, 2)

    def exchange():
        # What the alltoall dispatcher does with its split sizes (mappings.all_to_all short-circuits
        # a group of one, so call the collective it reaches at EP>1 directly).
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
        out = torch.empty_like(tokens)
        torch.distributed.all_to_all_single(out, tokens, output_split_sizes=splits, input_split_sizes=splits)
        return type(splits).__name__, out

    before_type = type(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)).__name__
    before_a2a = error(exchange)
    compat.shim_maybe_move_tensor_to_cpu()
    after_type, out = exchange()
    return {
        "before_type": before_type,
        "before_a2a": before_a2a,
        "after_type": after_type,
        "a2a_ok": torch.equal(out, tokens),
    }


def case_p8(rank, world_size):
    import torch
    from megatron.core.tensor_parallel import mappings

    from vespo_megatron.runtime import compat

    group = torch.distributed.group.WORLD
    sizes = [1, 3]
    local = torch.full((sizes[rank], 2), float(rank + 1))
    full = torch.arange(8.0).view(4, 2) * (rank + 1)  # reduce-scatter input: sum over ranks = 3x
    compat.shim_current_device()  # the gather allocates its output on the current device first
    before_gather = error(mappings._gather_along_first_dim, local, group, output_split_sizes=sizes)
    start = sum(sizes[:rank])
    expected_rs = (torch.arange(8.0).view(4, 2) * 3)[start : start + sizes[rank]]
    try:
        upstream_rs = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
        before_rs = "correct" if torch.equal(upstream_rs, expected_rs) else f"wrong: {upstream_rs.tolist()}"
    except Exception as exc:  # noqa: BLE001
        before_rs = f"{type(exc).__name__}: {exc}"
    compat.shim_uneven_split_mappings()
    gathered = mappings._gather_along_first_dim(local, group, output_split_sizes=sizes)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    return {
        "before_gather": before_gather,
        "before_rs": before_rs,
        "gather_ok": torch.equal(gathered, torch.tensor([[1.0, 1.0]] + [[2.0, 2.0]] * 3)),
        "rs_ok": torch.equal(scattered, expected_rs),
    }


CASES = {"P6_gone": (case_p6_gone, 1), "P7": (case_p7, 1), "P8": (case_p8, 2)}


@pytest.fixture(scope="module")
def outcomes():
    return run_driver(__file__)


def test_router_gemm_needs_no_shim(outcomes):
    r = result(outcomes, "P6_gone")
    assert r["te_general_gemm"] is None  # bound to None when Transformer Engine is absent
    assert r["logits_ok"] and r["grads_ok"]


def test_p7_split_sizes_become_numpy(outcomes):
    r = result(outcomes, "P7")
    assert r["before_type"] == "Tensor" and r["before_a2a"].startswith("TypeError")
    assert r["after_type"] == "ndarray" and r["a2a_ok"]


def test_p8_uneven_gather_and_reduce_scatter(outcomes):
    for rank in (0, 1):
        r = result(outcomes, "P8", rank)
        assert "invalid tensor size" in r["before_gather"] and r["gather_ok"]
        # gloo's reduce_scatter already takes uneven inputs; the shim must give the same result.
        assert r["before_rs"] == "correct" and r["rs_ok"]


def test_grouped_gemm_needs_transformer_engine():
    """The local spec ignores ``moe_grouped_gemm``; our layer spec must refuse it instead."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from vespo_megatron.config import load_config
    from vespo_megatron.models.gpt import layer_spec

    if torch.cuda.is_available():
        pytest.skip("checks the CPU (local spec) path")
    experts = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=True).submodules.mlp.keywords["submodules"]
    assert experts.experts.func.__name__ == "SequentialMLP"  # what upstream would silently build
    config = load_config(
        None, ["model.num_experts=4", "model.moe_ffn_hidden_size=32", "model.dtype=bf16", "model.moe_grouped_gemm=true"]
    )
    with pytest.raises(ValueError, match=r"model\.moe_grouped_gemm=true needs Transformer Engine"):
        layer_spec(config, None, None)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        drive(CASES, sys.argv[1])

"""Layer shims P2 (model-parallel RNG tracker) and P3 (default causal masks) on CPU.

Every case runs the unpatched upstream call first and records how it fails, then applies the shim and
records the same call's result. See tests/unit/compat_harness.py for how the cases run.
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.unit.compat_harness import cuda_missing, drive, error, init_parallel, result, run_driver


def case_p2(rank, world_size):
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from vespo_megatron.runtime import compat

    init_parallel()
    before = error(tensor_parallel.model_parallel_cuda_manual_seed, 1)
    compat.shim_cuda_rng_states_tracker()

    def draw(name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        torch.manual_seed(123)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        with tensor_parallel.get_cuda_rng_tracker().fork(name):
            forked = torch.randn(4)
        return forked, torch.randn(4)  # the default generator continues as if no fork happened

    forked_a, after_a = draw()
    forked_b, after_b = draw()
    forked_dp, _ = draw(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME)
    torch.manual_seed(123)
    no_fork = torch.randn(4)

    # Nested forks: upstream tracks the active state by name, so re-entering the active stream
    # continues it (no repeated draws) and leaving returns to where the inner fork left it.
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        nested = [torch.randn(3)]
        with tracker.fork():
            nested.append(torch.randn(3))
        nested.append(torch.randn(3))
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        flat = [torch.randn(3) for _ in range(3)]
    nested_ok = all(torch.equal(a, b) for a, b in zip(nested, flat))

    # Activation recompute re-runs forward under the saved tracker state: dropout masks must match.
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    x = torch.ones(64, requires_grad=True)

    def dropped(inp):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(inp, p=0.5, training=True)

    initialized = tensor_parallel.get_cuda_rng_tracker().is_initialized()
    out = tensor_parallel.checkpoint(dropped, False, x)
    out.sum().backward()  # d(sum(mask * 2 * x))/dx = mask * 2 = out, if recompute redraws the mask
    return {
        "before": before,
        "reproducible": torch.equal(forked_a, forked_b),
        "streams_differ": not torch.equal(forked_a, forked_dp),
        "default_untouched": torch.equal(after_a, no_fork) and torch.equal(after_b, no_fork),
        "nested_ok": nested_ok,
        "recompute_mask_matches": torch.equal(x.grad, out.detach()) and 0 < int((out == 0).sum()) < 64,
        "tracker_initialized": initialized,
    }


def case_p3(rank, world_size):
    import torch
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.runtime import compat

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False,
        mask_func=tutils.attention_mask_func,
        softmax_in_fp32=True,
        scale=None,
    )
    scores = torch.randn(1, 2, 4, 4)
    before = error(tutils.get_default_causal_mask, 4)
    before_softmax = error(softmax, scores, None)
    before_window = error(tutils.get_sliding_window_causal_mask, 3, 5, (1, 0))
    compat.shim_get_default_causal_mask()
    probs = softmax(scores, None)
    window = tutils.get_sliding_window_causal_mask(3, 5, (1, 0))
    # The upstream formula, evaluated on CPU.
    ones = torch.ones(3, 5, dtype=torch.bool)
    window_ref = ~torch.tril(torch.triu(ones, diagonal=5 - 3 - 1), diagonal=5 - 3 + 0)
    return {
        "before": before,
        "before_softmax": before_softmax,
        "before_window": before_window,
        "mask_ok": torch.equal(tutils.get_default_causal_mask(4), torch.triu(torch.ones(4, 4), 1).bool()),
        "probs_causal": bool((probs.triu(1) == 0).all()) and torch.allclose(probs.sum(-1), torch.ones(1, 2, 4)),
        "window_ok": torch.equal(window, window_ref),
    }


CASES = {"P2": (case_p2, 1), "P3": (case_p3, 1)}


@pytest.fixture(scope="module")
def outcomes():
    return run_driver(__file__)


def test_p2_rng_tracker_seeds_and_forks(outcomes):
    r = result(outcomes, "P2")
    assert cuda_missing(r["before"]), r["before"]
    assert r["reproducible"] and r["streams_differ"] and r["default_untouched"] and r["nested_ok"]
    assert r["recompute_mask_matches"] and r["tracker_initialized"]


def test_p3_default_causal_mask(outcomes):
    r = result(outcomes, "P3")
    for key in ("before", "before_softmax", "before_window"):
        assert cuda_missing(r[key]), (key, r[key])
    assert r["mask_ok"] and r["probs_causal"] and r["window_ok"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        drive(CASES, sys.argv[1])

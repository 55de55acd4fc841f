"""``apply_cpu_compat`` as a whole: idempotent, a no-op where CUDA exists, and every target is real.

See tests/unit/compat_harness.py for how the cases run (never in the pytest process).
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.unit.compat_harness import cuda_missing, drive, error, init_parallel, result, run_driver


def _patched_targets():
    """The objects every shim rebinds, by a readable name (identity tells whether a shim re-ran)."""
    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import token_dispatcher

    return {
        "current_device": torch.cuda.current_device,
        "tracker_class": mrandom.CudaRNGStatesTracker,
        "tracker": mrandom._CUDA_RNG_STATE_TRACKER,
        "causal_mask": tutils.get_default_causal_mask,
        "stream": torch.cuda.Stream,
        "synchronize": torch.cuda.synchronize,
        "move_to_cpu": token_dispatcher.maybe_move_tensor_to_cpu,
        "gather": mappings._gather_along_first_dim,
        "zeros": torch.zeros,
        "arange": torch.arange,
        "tensor_cuda": torch.Tensor.cuda,
        "tensor_to": torch.Tensor.to,
        "tensor_type": torch.Tensor.type,
        "results_queue": filesystem_async.get_write_results_queue,
    }


def case_idempotent(rank, world_size):
    from megatron.core import tensor_parallel

    from vespo_megatron.runtime import compat

    init_parallel()
    pristine = _patched_targets()
    first_ids = compat.apply_cpu_compat()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    states = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    once = _patched_targets()
    second_ids = compat.apply_cpu_compat()
    for shim in compat.SHIMS:
        shim.apply()
    twice = _patched_targets()
    states_after = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "ids": [first_ids, second_ids, compat.applied_shims()],
        "all_ids": sorted(shim.shim_id for shim in compat.SHIMS),
        "changed_by_first": sorted(k for k in once if once[k] is not pristine[k]),
        "changed_by_second": sorted(k for k in twice if twice[k] is not once[k]),
        "seeded_states_kept": states.keys() == states_after.keys()
        and all(states[k].equal(states_after[k]) for k in states),
    }


def case_noop_with_cuda(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    torch.cuda.is_available = lambda: True  # this worker pretends to be a GPU machine
    pristine = _patched_targets()
    needed = compat.cpu_compat_needed()
    applied = compat.apply_cpu_compat()
    after = _patched_targets()
    return {
        "needed": needed,
        "applied": applied,
        "changed": sorted(k for k in after if after[k] is not pristine[k]),
        "still_fails": error(torch.zeros, 1, device="cuda"),
    }


def case_upstream(rank, world_size):
    """Resolve each dotted ``Shim.upstream`` in the unpatched process."""
    import importlib

    from vespo_megatron.runtime import compat

    found = {}
    for shim in compat.SHIMS:
        parts = shim.upstream.split(".")
        if not all(part.isidentifier() for part in parts):
            found[shim.shim_id] = "not a dotted path"
            continue
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            rest = parts[cut:]
            break
        else:
            found[shim.shim_id] = "no importable module"
            continue
        try:
            for name in rest:
                obj = getattr(obj, name)
            found[shim.shim_id] = "exists"
        except AttributeError:
            found[shim.shim_id] = "missing"
    return {"found": found}


CASES = {
    "idempotent": (case_idempotent, 1),
    "noop_with_cuda": (case_noop_with_cuda, 1),
    "upstream": (case_upstream, 1),
}


@pytest.fixture(scope="module")
def outcomes():
    return run_driver(__file__)


def test_apply_is_idempotent(outcomes):
    r = result(outcomes, "idempotent")
    first, second, applied = r["ids"]
    assert first == second == applied == r["all_ids"]
    assert sorted(r["changed_by_first"]) == sorted(_TARGET_NAMES)  # every shim really rebinds its target
    assert r["changed_by_second"] == []
    assert r["seeded_states_kept"]


def test_apply_is_noop_when_cuda_present(outcomes):
    r = result(outcomes, "noop_with_cuda")
    assert r["needed"] is False and r["applied"] == [] and r["changed"] == []
    assert cuda_missing(r["still_fails"]), r["still_fails"]


def test_shim_upstream_names_exist(outcomes):
    r = result(outcomes, "upstream")
    assert set(r["found"]) == {"P1", "P2", "P3", "P5", "P7", "P8", "P10", "P11", "P12"}
    for shim_id, status in r["found"].items():
        assert status == ("not a dotted path" if shim_id == "P10" else "exists"), (shim_id, status)


_TARGET_NAMES = (
    "current_device", "tracker_class", "tracker", "causal_mask", "stream", "synchronize", "move_to_cpu",
    "gather", "zeros", "arange", "tensor_cuda", "tensor_to", "tensor_type", "results_queue",
)  # fmt: skip


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        drive(CASES, sys.argv[1])

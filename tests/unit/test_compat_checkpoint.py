"""Dist-checkpointing shim P12: a synchronous save spawns no ``multiprocessing.Manager``.

With every other shim applied, the case first saves with upstream's write-results queue and counts the Manager processes it starts
(a probe stands in for ``multiprocessing``, so nothing is really spawned), then applies the shim and
saves again. See tests/unit/compat_harness.py for how the cases run.
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.unit.compat_harness import drive, result, run_driver


class _ManagerProbe:
    """Stands in for ``multiprocessing`` in filesystem_async: records Manager spawns without spawning."""

    def __init__(self):
        self.managers = 0

    def get_context(self, method):
        probe = self

        class Context:
            def Manager(self):  # noqa: N802 - mirrors multiprocessing's name
                probe.managers += 1
                import queue

                return type("FakeManager", (), {"Queue": staticmethod(queue.Queue)})()

        return Context()


def _save_and_load(directory, value: float):
    """One synchronous ``dist_checkpointing.save`` of a one-tensor state, then load it back."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    def state(tensor):
        return {"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}

    directory.mkdir()
    dist_checkpointing.save(state(torch.full((4,), value)), str(directory))
    loaded = dist_checkpointing.load(state(torch.zeros(4)), str(directory))
    return loaded["w"]


def case_p12(rank, world_size):
    import tempfile
    from pathlib import Path

    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from vespo_megatron.runtime import compat

    for shim in compat.SHIMS:  # the save path needs the device shims (e.g. P5's synchronize)
        if shim.shim_id != "P12":
            shim.apply()
    probe = _ManagerProbe()
    filesystem_async.mp = probe
    filesystem_async._results_queue = None
    with tempfile.TemporaryDirectory() as tmp:
        before_loaded = _save_and_load(Path(tmp) / "a", 3.0)
        before = probe.managers
        filesystem_async._results_queue = None
        compat.shim_write_results_queue()
        after_loaded = _save_and_load(Path(tmp) / "b", 5.0)
        first = filesystem_async.get_write_results_queue()
        second = filesystem_async.get_write_results_queue("fork")
    return {
        "before_managers": before,
        "after_managers": probe.managers - before,
        "in_process": first is second and not isinstance(first, type(probe)),
        "before_loaded": torch.equal(before_loaded, torch.full((4,), 3.0)),
        "after_loaded": torch.equal(after_loaded, torch.full((4,), 5.0)),
    }


CASES = {"P12": (case_p12, 1)}


@pytest.fixture(scope="module")
def outcomes():
    return run_driver(__file__)


def test_p12_sync_save_spawns_no_manager(outcomes):
    r = result(outcomes, "P12")
    assert r["before_managers"] == 1 and r["before_loaded"]  # upstream: one Manager per process
    assert r["after_managers"] == 0 and r["after_loaded"] and r["in_process"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        drive(CASES, sys.argv[1])

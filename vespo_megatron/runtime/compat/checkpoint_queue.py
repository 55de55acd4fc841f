"""Dist-checkpointing's write-results queue in process (P12), so a synchronous save spawns no Manager."""

from __future__ import annotations

import queue

from vespo_megatron.runtime.compat.base import once


# ---------------------------------------------------------------------------------------------- P12


@once("P12")
def shim_write_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    in_process_queue = queue.Queue()

    def get_write_results_queue(mp_mode: str = "spawn"):
        return in_process_queue

    filesystem_async.get_write_results_queue = get_write_results_queue

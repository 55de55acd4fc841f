"""The model-parallel RNG tracker over the CPU generator (P2)."""

from __future__ import annotations

import contextlib

import torch

from vespo_megatron.runtime.compat.base import once


# ---------------------------------------------------------------------------------------------- P2


@once("P2")
def shim_cuda_rng_states_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    upstream = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(upstream):
        """Model-parallel RNG tracker over the CPU generator (same semantics as the CUDA one)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"cuda rng state {name} already exists")
            self._is_initialized = True
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.seeds_.add(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # Upstream's fork, minus its "CPU RNG state changed" warning: here the forked generator
            # is the CPU one, so it changes on every fork by design. Nested forks keep the outer
            # state by name, as upstream does.
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer_name = getattr(self, "_current_state_name", "default-rng")
            saved = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = saved
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    saved = self.states_[outer_name]
                torch.set_rng_state(saved)
                self._current_state_name = outer_name

    def get_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.initialize_rng_tracker(force_reset=True)

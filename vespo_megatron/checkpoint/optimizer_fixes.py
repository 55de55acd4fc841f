"""Loading Megatron's optimizer state into torch's Adam (no Transformer Engine / apex, e.g. on CPU).

Megatron's DistributedOptimizer assumes the fused Adam of TE/apex, whose state has no ``step``; torch's
Adam keeps one ``step`` tensor per parameter and has no state before its first step. The two helpers
here bridge that for :func:`vespo_megatron.checkpoint.store.load_checkpoint`; with TE/apex they change
nothing.
"""

from __future__ import annotations

import contextlib

import torch


def allocate_adam_state(optimizer) -> None:
    """Give a torch Adam that has not stepped yet zero state, ``step`` included, to be overwritten by the load.

    Megatron's DistributedOptimizer reads ``step`` from the torch optimizer's state while building
    its state dict; with torch's Adam (no TE/apex, e.g. on CPU) a fresh optimizer has none.
    """
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(member, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def torch_adam_load_fixes(optimizer):
    """Two fixes for DistributedOptimizer loads with torch's Adam (found on megatron-core 0.16.1, no TE/apex).

    Its load puts one shared ``step`` tensor into every parameter's torch state, then copies every
    state entry from the checkpoint tensors, which leave ``step`` out (KeyError: 'step'). The
    wrapper hands the just-set ``step`` back as its own source, so that copy is a no-op; afterwards
    each parameter gets its own ``step`` (torch's Adam increments it in place, once per parameter).
    With TE/apex there is no ``step`` in the state and nothing changes.
    """
    patched = []
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(member, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, member=member, original=original):
            group_index, group_order = member.model_param_group_index_map[model_param]
            main_param = member.optimizer.param_groups[group_index]["params"][group_order]
            step = member.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            original(model_param, tensors)

        member._set_main_param_and_optimizer_states = set_states
        patched.append(member)
    try:
        yield
    finally:
        for member in patched:
            del member._set_main_param_and_optimizer_states
    for member in patched:
        for state in member.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

"""Checkpoint store: atomic Megatron dist-checkpoint saves, resharding loads, ``latest``, pruning.

A checkpoint is ``ROOT/step_{step:08d}/`` holding a Megatron ``dist_checkpointing`` save of the
model chunks and the optimizer (``dist/``), the scheduler and iteration as JSON
(``trainer_state.json``) and one small file per rank with that rank's RNG states and the caller's
``extra_state`` (``ranks/rank_{rank:05d}.pt``). It is written into ``step_X.tmp`` and renamed when
complete, and the ``latest`` pointer is rewritten last, so a crash mid-save leaves the previous
checkpoint untouched. Loading never unpickles arbitrary objects; docs/checkpoints.md gives the
layout, the resume semantics and the reasons.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from vespo_megatron.checkpoint.optimizer_fixes import allocate_adam_state, torch_adam_load_fixes
from vespo_megatron.checkpoint.rng import rng_state, set_rng_state
from vespo_megatron.checkpoint.safe_load import check_dcp_metadata, load_weights_only
from vespo_megatron.models.gpt import unwrap
from vespo_megatron.runtime.distributed import collective_device
from vespo_megatron.runtime.files import fsync_dir, write_atomic

FORMAT_VERSION = 1
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
DIST_DIR = "dist"
RANKS_DIR = "ranks"
# Megatron's DistributedOptimizer format that reshards over TP/PP/DP and holds only tensors and
# plain values. "dp_reshardable" stores pickled ShardedObjects; "fully_sharded_model_space" fails
# in megatron-core 0.16.1 and 0.19.2 ("ShardedTensor.flattened_range is not supported").
DISTOPT_SHARDING_TYPE = "fully_reshardable"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class LoadedCheckpoint(dict):
    """The ``extra_state`` saved by this rank (or by rank 0 when the layout changed), plus what was restored.

    Attributes: ``step``, ``path``, ``optimizer_loaded`` (False when the optimizer kind changed:
    distributed or not, or dtype; Adam then restarts from zero state. A checkpoint taken before
    the first step holds no optimizer state and a fresh optimizer is its exact resume: True),
    ``rng_restored`` and ``layout_matches`` (False when the rank layout differs from the saved
    one; RNG states are then left as they are).
    """

    def __init__(self, extra_state: dict, *, step: int, path: Path, optimizer_loaded: bool,
                 rng_restored: bool, layout_matches: bool):
        super().__init__(extra_state)
        self.step = step
        self.path = path
        self.optimizer_loaded = optimizer_loaded
        self.rng_restored = rng_restored
        self.layout_matches = layout_matches


# ------------------------------------------------------------------------------------------- save


def save_checkpoint(engine, directory_root, step: int, extra_state: dict, keep_last: Optional[int] = None
                    ) -> Path:
    """Save ``engine`` and ``extra_state`` as ``ROOT/step_{step:08d}``; collective over all ranks.

    ``extra_state`` is this rank's: plain values (dict, list, tuple, str, int, float, bool, None)
    and tensors, e.g. the data position and RNG states. ``keep_last`` (default
    ``config.checkpoint.keep_last``) newest complete checkpoints are kept once the new one is in place.
    """
    from megatron.core import dist_checkpointing

    engine.gather_params()  # the distributed optimizer's lazily gathered parameters, made current
    root = Path(directory_root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    rank = dist.get_rank()
    rank_file = _all_ranks_or_none(lambda: _rank_file_bytes(engine, extra_state))
    # Before the first step the optimizer has no state; a fresh one is then the exact resume.
    with_optimizer = _optimizer_has_state(engine.optimizer)
    _all_ranks_or_none(lambda: _make_empty(tmp) if rank == 0 else None)

    dist_checkpointing.save(_sharded_state(engine, is_loading=False, with_optimizer=with_optimizer),
                            str(tmp / DIST_DIR))
    _all_ranks_or_none(lambda: write_atomic(tmp / RANKS_DIR / f"rank_{rank:05d}.pt", rank_file))

    def publish() -> None:
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "iteration": engine.iteration,
            "scheduler": engine.scheduler.state_dict(),
            "layout": _layout(engine.ctx),
            "optimizer": _optimizer_kind(engine),
            "optimizer_saved": with_optimizer,
            "reference_saved": engine.reference_chunks is not None,
        }
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
        _replace_dir(tmp, final)
        write_atomic(root / LATEST_FILE, f"{step}\n".encode())
        _prune(root, keep_last if keep_last is not None else engine.config.checkpoint.keep_last, keep=final)

    _all_ranks_or_none(lambda: publish() if rank == 0 else None)
    return final


def _make_empty(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier save that crashed
    (tmp / DIST_DIR).mkdir(parents=True)
    (tmp / RANKS_DIR).mkdir()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a complete checkpoint already at ``final`` (same step) is replaced."""
    if final.exists():
        old = final.with_name(final.name + ".old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and stale ``.tmp`` directories."""
    complete = sorted(_complete_steps(root))
    for step in complete[: max(len(complete) - keep_last, 0)]:
        path = root / f"step_{step:08d}"
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for entry in root.iterdir()
            if (m := _STEP_DIR.match(entry.name)) and (entry / STATE_FILE).is_file()]


def latest_checkpoint(directory_root) -> Optional[Path]:
    """The checkpoint named by ``ROOT/latest``, else the newest complete ``step_X``; None if there is none."""
    root = Path(directory_root)
    pointer = root / LATEST_FILE
    try:
        step = int(pointer.read_text().strip())
        candidate = root / f"step_{step:08d}"
        if (candidate / STATE_FILE).is_file():
            return candidate
    except (OSError, ValueError):
        pass
    steps = _complete_steps(root)
    return root / f"step_{max(steps):08d}" if steps else None


# ------------------------------------------------------------------------------------------- load


def load_checkpoint(engine, path) -> LoadedCheckpoint:
    """Load model, optimizer, scheduler, iteration and this rank's RNG states; return ``extra_state``.

    The model is resharded to the engine's layout (TP/PP/VPP/DP/EP may differ). The optimizer is
    loaded whenever its kind (distributed or not) matches the saved one, resharded by Megatron;
    otherwise only the model is loaded and a warning says so. Collective over all ranks: a rank
    that refuses a file makes every rank raise.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / STATE_FILE}: format_version={state.get('format_version')} is not "
                         f"{FORMAT_VERSION}; this checkpoint was written by another version of vespo_megatron")
    layout_matches = state["layout"] == _layout(engine.ctx)
    rank_file = path / RANKS_DIR / f"rank_{dist.get_rank() if layout_matches else 0:05d}.pt"
    rank_state = _all_ranks_or_none(lambda: _preflight(path, rank_file))

    same_optimizer = state["optimizer"] == _optimizer_kind(engine)
    load_optimizer = same_optimizer and state["optimizer_saved"]
    if load_optimizer:
        allocate_adam_state(engine.optimizer)
    load_reference = engine.reference_chunks is not None and state.get("reference_saved", False)
    request = _sharded_state(engine, is_loading=True, with_optimizer=load_optimizer, with_reference=load_reference)
    request, local_objects = _split_sharded_objects(request)
    loaded = dist_checkpointing.load(request, str(path / DIST_DIR))
    _merge_local_objects(loaded, local_objects)

    for index, chunk in enumerate(engine.chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{index}"])
    if engine.reference_chunks is not None:
        if not load_reference:
            warnings.warn(f"{path}: no KL reference in this checkpoint; the reference is the loaded policy")
        for index, chunk in enumerate(engine.reference_chunks):
            if load_reference:
                prefix = "reference."
                source = {key[len(prefix):]: value for key, value in loaded[f"reference{index}"].items()}
            else:
                source = loaded[f"model{index}"]
            unwrap(chunk).load_state_dict(source)
    if load_optimizer:
        with torch_adam_load_fixes(engine.optimizer):
            engine.optimizer.load_state_dict(loaded["optimizer"])
    else:
        engine.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if not same_optimizer:
        warnings.warn(f"{path}: optimizer saved as {state['optimizer']} but this run uses "
                      f"{_optimizer_kind(engine)}; loaded the model only, optimizer state starts fresh")
    engine.scheduler.load_state_dict(state["scheduler"])
    engine.iteration = state["iteration"]
    if layout_matches:
        set_rng_state(rank_state["rng"])
    else:
        warnings.warn(f"{path}: saved with layout {state['layout']}, running {_layout(engine.ctx)}; "
                      "RNG states not restored, extra_state is rank 0's")
    return LoadedCheckpoint(rank_state["extra_state"], step=state["step"], path=path,
                            optimizer_loaded=same_optimizer, rng_restored=layout_matches,
                            layout_matches=layout_matches)


def _preflight(path: Path, rank_file: Path) -> dict:
    """Read everything this rank will unpickle before any collective load starts."""
    check_dcp_metadata(path / DIST_DIR / ".metadata")
    legacy_common = path / DIST_DIR / "common.pt"
    if legacy_common.exists():  # older Megatron wrote common state here; 0.19 reads it with a plain torch.load
        load_weights_only(legacy_common)
    rank_state = load_weights_only(rank_file)
    if not isinstance(rank_state, dict) or set(rank_state) != {"rank", "layout", "rng", "extra_state"}:
        raise ValueError(f"{rank_file} is not a vespo_megatron rank state file")
    return rank_state


def _all_ranks_or_none(check):
    """Run ``check`` on every rank, then agree: if any rank failed, every rank raises (none is left
    waiting in a collective); otherwise this rank's result. Doubles as the barrier between phases."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    failed = torch.tensor([0 if error is None else 1], device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("another rank failed this checkpoint phase; see its error")
    return result


def _optimizer_has_state(optimizer) -> bool:
    inners = [getattr(member, "optimizer", None) for member in getattr(optimizer, "chained_optimizers", [optimizer])]
    stepped = torch.tensor([int(any(inner is not None and len(inner.state) > 0 for inner in inners))],
                           device=collective_device())
    dist.all_reduce(stepped, op=dist.ReduceOp.MAX)
    return bool(stepped.item())


# --------------------------------------------------------------------------------- state contents


def _sharded_state(engine, is_loading: bool, with_optimizer: bool = True, with_reference: bool = True) -> dict:
    state = {f"model{index}": unwrap(chunk).sharded_state_dict() for index, chunk in enumerate(engine.chunks)}
    if with_optimizer:
        model_state = dict(state)
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": DISTOPT_SHARDING_TYPE})
    if with_reference and engine.reference_chunks is not None:
        # The frozen KL reference (rl.kl_coef > 0) under its own key prefix.
        for index, chunk in enumerate(engine.reference_chunks):
            state[f"reference{index}"] = unwrap(chunk).sharded_state_dict(prefix="reference.")
    if not is_loading:
        state, _ = _split_sharded_objects(state)
    return state


def _split_sharded_objects(state: dict) -> tuple[dict, dict]:
    """Take out Megatron ShardedObjects (saved as pickles, read back with ``weights_only=False``).

    In the local layer spec they are the linears' ``_extra_state``, which is None; they are neither
    saved nor loaded, and the module keeps its current value.
    """
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    objects, rest = extract_matching_values(state, lambda value: isinstance(value, ShardedObject))
    return rest, objects


def _merge_local_objects(loaded: dict, objects: dict) -> None:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge

    merge(loaded, dict_list_map_inplace(lambda sharded_object: sharded_object.data, objects))


def _layout(ctx) -> dict:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp, "cp": ctx.cp,
            "ep": ctx.ep, "etp": ctx.etp, "dp": ctx.dp}


def _optimizer_kind(engine) -> dict:
    distributed = engine.config.optimizer.use_distributed_optimizer
    return {"distributed": distributed, "sharding_type": DISTOPT_SHARDING_TYPE if distributed else None,
            "dtype": engine.config.model.dtype}


def _rank_file_bytes(engine, extra_state: dict) -> bytes:
    ctx = engine.ctx
    state = {
        "rank": {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "cp_rank": ctx.cp_rank,
                 "ep_rank": ctx.ep_rank, "dp_rank": ctx.dp_rank},
        "layout": _layout(ctx),
        "rng": rng_state(),
        "extra_state": dict(extra_state),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # Refuse at save time what the weights-only load would refuse at resume time.
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TypeError(f"extra_state must hold only tensors and plain values (dict, list, tuple, str, int, "
                        f"float, bool, None): {exc}") from exc
    return buffer.getvalue()

"""Checkpoints: exact resume, resharding, atomic layout on disk, refusing pickles, the preemption flag.

Each test runs a tiny dense GPT on forked gloo workers; a "fresh worker set" is a new
``run_local_workers`` call, so nothing survives between save and load except the files.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from tests.dist.equivalence_harness import DENSE, micro_batches
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

TP2 = ["parallel.tp=2"]
DP2_DISTOPT = ["optimizer.use_distributed_optimizer=true"]


def _engine(overrides):
    from vespo_megatron.config import load_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, DENSE + overrides)
    return build_engine(config, initialize(config), vocab_size=64)


def _train(engine, steps: int) -> list[float]:
    """``steps`` SFT steps; step i uses the global batch drawn with seed 100 + iteration."""
    from vespo_megatron.train.sft import sft_loss_head

    losses = []
    for _ in range(steps):
        batches = micro_batches(seed=100 + engine.iteration)
        per_rank = len(batches) // engine.ctx.dp
        mine = batches[engine.ctx.dp_rank * per_rank : (engine.ctx.dp_rank + 1) * per_rank]
        result = engine.train_step(mine, sft_loss_head)
        assert not result.skipped
        losses.append(result.metrics["sft/loss"])
    return losses


def _local_params(engine) -> dict[str, torch.Tensor]:
    from vespo_megatron.models.gpt import unwrap

    return {f"{i}.{name}": p.detach().clone()
            for i, chunk in enumerate(engine.chunks) for name, p in unwrap(chunk).named_parameters()}


def _rng_probe() -> list[float]:
    return torch.rand(3).tolist() + [random.random()]


# ---------------------------------------------------------------------------------- 1. exact resume


def _train_save_continue(rank, world, overrides, root):
    from vespo_megatron.checkpoint import save_checkpoint

    engine = _engine(overrides)
    _train(engine, 2)
    extra = {"data_position": 2 * world, "counters": {"seen": [1, 2]}, "rng_copy": torch.get_rng_state()}
    path = save_checkpoint(engine, root, engine.iteration, extra)
    probe = _rng_probe()
    losses = _train(engine, 2)
    return str(path), probe, losses, _local_params(engine), engine.optimizer.param_groups[0]["lr"]


def _load_continue(rank, world, overrides, path):
    from vespo_megatron.checkpoint import load_checkpoint

    engine = _engine(overrides)
    loaded = load_checkpoint(engine, path)
    flags = (loaded.optimizer_loaded, loaded.rng_restored, loaded.layout_matches, loaded.step, engine.iteration)
    probe = _rng_probe()
    losses = _train(engine, 2)
    return dict(loaded), flags, probe, losses, _local_params(engine), engine.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("layout", [TP2, DP2_DISTOPT], ids=["tp2", "dp2-distopt"])
def test_resume_is_bit_identical(tmp_path, layout):
    before = run_local_workers(_train_save_continue, 2, layout, str(tmp_path))
    after = run_local_workers(_load_continue, 2, layout, before[0][0])
    for rank, ((_, probe, losses, params, lr), (extra, flags, probe2, losses2, params2, lr2)) in enumerate(
            zip(before, after)):
        assert flags == (True, True, True, 2, 2)
        assert extra["data_position"] == 4 and extra["counters"] == {"seen": [1, 2]}
        assert extra["rng_copy"].dtype == torch.uint8
        assert probe2 == probe, f"rank {rank}: RNG state not restored"
        assert losses2 == losses and lr2 == lr
        assert params2.keys() == params.keys()
        for name in params:
            assert torch.equal(params2[name], params[name]), f"rank {rank}: {name} differs after resume"


# --------------------------------------------------------------------------------------- 2. reshard


def _shard_of(full: torch.Tensor, param, tp: int, tp_rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [part.chunk(tp, dim=dim)[tp_rank] for part in full.chunk(stride, dim=dim)]
    return torch.cat(parts, dim=dim)


def _tp_shards_and_continue(rank, world, overrides, root):
    from vespo_megatron.checkpoint import save_checkpoint
    from vespo_megatron.models.gpt import unwrap

    engine = _engine(overrides)
    _train(engine, 2)
    save_checkpoint(engine, root, engine.iteration, {"data_position": 7})
    shards = {name: (p.detach().clone(), getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1),
                     getattr(p, "partition_stride", 1))
              for name, p in unwrap(engine.chunks[0]).named_parameters()}
    return shards, _train(engine, 2)


def _load_single_rank(rank, world, overrides, root):
    from vespo_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from vespo_megatron.models.gpt import unwrap

    engine = _engine(overrides)
    loaded = load_checkpoint(engine, latest_checkpoint(root))
    full = {name: p.detach().clone() for name, p in unwrap(engine.chunks[0]).named_parameters()}
    flags = (loaded.optimizer_loaded, loaded.rng_restored, loaded.layout_matches, dict(loaded))
    return full, flags, _train(engine, 2)


def test_reshard_tp2_to_tp1(tmp_path):
    saved = run_local_workers(_tp_shards_and_continue, 2, TP2, str(tmp_path))
    full, flags, losses = run_local_workers(_load_single_rank, 1, [], str(tmp_path))[0]
    assert flags == (True, False, False, {"data_position": 7})
    for tp_rank, (shards, tp_losses) in enumerate(saved):
        assert shards.keys() == full.keys()
        for name, (shard, is_tp, dim, stride) in shards.items():
            param = torch.nn.Parameter(full[name])
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = is_tp, dim, stride
            assert torch.equal(_shard_of(full[name], param, 2, tp_rank), shard), name
    # Model and Adam state were resharded: tp=1 continues as tp=2 did, to fp32 noise.
    assert losses == pytest.approx(saved[0][1], abs=1e-5)


def test_optimizer_kind_change_loads_model_only(tmp_path):
    run_local_workers(_tp_shards_and_continue, 2, DP2_DISTOPT, str(tmp_path))
    _, flags, losses = run_local_workers(_load_single_rank, 1, [], str(tmp_path))[0]
    assert flags[:3] == (False, False, False)
    assert all(loss == loss for loss in losses)


# ------------------------------------------------------------------------- 3. layout on disk, atomicity


def _save_prune_crash(rank, world, root):
    from pathlib import Path

    from vespo_megatron.checkpoint import store as ck

    root = Path(root)
    engine = _engine([])
    pointer_writes = []
    write_atomic = ck.write_atomic

    def spy(path, data):
        if path.name == ck.LATEST_FILE:
            step = int(data)
            pointer_writes.append(((root / f"step_{step:08d}" / ck.STATE_FILE).is_file(),
                                   (root / f"step_{step:08d}.tmp").exists()))
        write_atomic(path, data)

    ck.write_atomic = spy
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(engine, root, step, {"step": step}, keep_last=2)
    kept = sorted(p.name for p in root.iterdir())

    replace_dir = ck._replace_dir
    ck._replace_dir = lambda tmp, final: (_ for _ in ()).throw(RuntimeError("simulated crash before the rename"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        ck.save_checkpoint(engine, root, 5, {"step": 5}, keep_last=2)
    ck._replace_dir = replace_dir
    after_crash = (sorted(p.name for p in root.iterdir()), (root / "latest").read_text().strip(),
                   ck.latest_checkpoint(root).name)
    resumed = dict(ck.load_checkpoint(_engine([]), ck.latest_checkpoint(root)))

    ck.save_checkpoint(engine, root, 6, {"step": 6}, keep_last=2)
    ck.save_checkpoint(engine, root, 6, {"step": 6, "again": True}, keep_last=2)  # same step: replaced
    final = sorted(p.name for p in root.iterdir())
    return kept, pointer_writes, after_crash, resumed, final, dict(ck.load_checkpoint(engine, root / "step_00000006"))


def test_keep_last_atomic_rename_and_pointer_last(tmp_path):
    kept, pointer_writes, after_crash, resumed, final, last = run_local_workers(
        _save_prune_crash, 1, str(tmp_path))[0]
    assert kept == ["latest", "step_00000003", "step_00000004"]
    assert pointer_writes[:4] == [(True, False)] * 4  # the pointer moves only once the directory is complete
    assert after_crash == (["latest", "step_00000003", "step_00000004", "step_00000005.tmp"], "4", "step_00000004")
    assert resumed == {"step": 4}
    assert final == ["latest", "step_00000004", "step_00000006"]  # the stale .tmp went with the pruning
    assert last == {"step": 6, "again": True}


def test_latest_checkpoint_ignores_tmp_and_bad_pointers(tmp_path):
    from vespo_megatron.checkpoint import STATE_FILE, latest_checkpoint

    assert latest_checkpoint(tmp_path / "absent") is None
    for name in ("step_00000002", "step_00000010", "step_00000020.tmp", "step_00000030"):
        (tmp_path / name).mkdir()
        if name != "step_00000030":  # a directory without trainer_state.json is not a checkpoint
            (tmp_path / name / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    (tmp_path / "latest").write_text("2\n")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    for pointer in ("20\n", "7\n", "garbage"):
        (tmp_path / "latest").write_text(pointer)
        assert latest_checkpoint(tmp_path).name == "step_00000010"


# ------------------------------------------------------------------------------- 4. no unpickling


class _OpensAFile:
    """Unpickling this creates a file: the stand-in for arbitrary code in a tampered checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refuse_pickles(rank, world, root):
    from pathlib import Path

    from vespo_megatron import checkpoint as ck

    root = Path(root)
    engine = _engine([])
    outcomes = {}

    def attempt(name, tamper):
        path = ck.save_checkpoint(engine, root / name, 1, {"data_position": 1})
        marker = root / f"{name}.marker"
        tamper(path, str(marker))
        try:
            ck.load_checkpoint(_engine([]), path)
            outcomes[name] = ("loaded", marker.exists())
        except Exception as exc:  # noqa: BLE001 - the test inspects the type
            outcomes[name] = (type(exc).__name__, marker.exists())

    def rank_file(path, marker):
        state = torch.load(path / "ranks" / "rank_00000.pt", weights_only=True)
        state["extra_state"]["payload"] = _OpensAFile(marker)
        torch.save(state, path / "ranks" / "rank_00000.pt")

    def dcp_metadata(path, marker):
        import pickle

        (path / "dist" / ".metadata").write_bytes(pickle.dumps(_OpensAFile(marker)))

    def common(path, marker):
        # A legacy-format common.pt beside the torch_dist files: Megatron prefers it over the common state
        # stored inside the checkpoint and reads it with a plain torch.load.
        torch.save({"payload": _OpensAFile(marker)}, path / "dist" / "common.pt")

    attempt("untouched", lambda path, marker: None)
    attempt("rank_file", rank_file)
    attempt("dcp_metadata", dcp_metadata)
    attempt("common", common)
    try:
        ck.save_checkpoint(engine, root / "bad_extra", 1, {"payload": _OpensAFile(str(root / "never"))})
        outcomes["bad_extra"] = "saved"
    except TypeError:
        outcomes["bad_extra"] = ("TypeError", ck.latest_checkpoint(root / "bad_extra"))
    return outcomes


def test_pickled_objects_are_refused(tmp_path):
    outcomes = run_local_workers(_refuse_pickles, 1, str(tmp_path))[0]
    assert outcomes["untouched"] == ("loaded", False)
    for name in ("rank_file", "dcp_metadata", "common"):
        assert outcomes[name] == ("UnsafeCheckpointError", False), name
    assert outcomes["bad_extra"] == ("TypeError", None)


# ---------------------------------------------------------------------------------- 5. preemption


def _preempt(rank, world):
    from vespo_megatron.runtime.preemption import install_preemption_handler

    flag = install_preemption_handler()
    before = flag.should_stop()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    after = flag.should_stop()
    requested = (flag.requested, flag.signum)
    flag.uninstall()
    return before, after, requested, signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_preemption_flag_stops_every_rank():
    results = run_local_workers(_preempt, 2)
    assert [r[:2] for r in results] == [(False, True), (False, True)]
    assert results[0][2] == (False, None) and results[1][2] == (True, signal.SIGUSR1)
    assert all(r[3] for r in results)


def test_preemption_flag_without_process_group():
    from vespo_megatron.runtime.preemption import install_preemption_handler

    previous = signal.getsignal(signal.SIGTERM)
    flag = install_preemption_handler(signals=(signal.SIGTERM,))
    try:
        assert not flag.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous

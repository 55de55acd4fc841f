"""The learning rate of every optimizer update, supervised warm-up and RL, against the schedule.

The worker wraps the ``step`` of the torch optimizer(s) inside Megatron's optimizer and records each
parameter group's learning rate at the moment the update is applied, so the check sees the rate the
weights actually moved with (not a logged value). The expected rates are written here from the
schedule's definition: ``rl.sft_lr`` for each warm-up update, then Megatron's linear warm-up from 0
over ``optimizer.lr_warmup_steps`` updates and linear decay to ``optimizer.min_lr`` at the run's last
update (``train.steps`` x ``rl.num_minibatches``).
"""

from __future__ import annotations

import math

from tests.e2e.rl_fixtures import deterministic_records, load, overrides
from vespo_megatron.runtime.local_workers import run_local_workers

SFT_LR, LR, MIN_LR = 3e-3, 3e-4, 1e-5
WARMUP_UPDATES, SFT_STEPS, STEPS, MINIBATCHES = 2, 2, 3, 2


def _torch_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for sub in chained for inner in _torch_optimizers(sub)]
    return [optimizer.optimizer]


def _recording_worker(rank, world_size, overrides_):
    import vespo_megatron.rl.loop as loop

    applied: list[list[float]] = []
    build = loop.build_engine

    def build_and_record(*args, **kwargs):
        engine = build(*args, **kwargs)
        for inner in _torch_optimizers(engine.optimizer):
            step = inner.step

            def recording_step(*a, _inner=inner, _step=step, **k):
                applied.append(sorted({float(g["lr"]) for g in _inner.param_groups}))
                return _step(*a, **k)

            inner.step = recording_step
        return engine

    loop.build_engine = build_and_record
    loop.run(load(overrides_))
    return applied


def expected_schedule() -> list[float]:
    rates = [SFT_LR] * SFT_STEPS
    total = STEPS * MINIBATCHES
    for k in range(total):
        if k <= WARMUP_UPDATES:
            rates.append(LR * k / WARMUP_UPDATES)
        else:
            progress = (k - WARMUP_UPDATES) / (total - WARMUP_UPDATES)
            rates.append(MIN_LR + (LR - MIN_LR) * (1.0 - progress))
    return rates


def test_every_update_runs_at_the_scheduled_learning_rate(tmp_path):
    extra = [f"rl.sft_warmup_steps={SFT_STEPS}", f"rl.sft_lr={SFT_LR}", f"optimizer.lr={LR}",
             f"optimizer.min_lr={MIN_LR}", f"optimizer.lr_warmup_steps={WARMUP_UPDATES}",
             "optimizer.lr_decay_style=linear", f"train.steps={STEPS}", f"rl.num_minibatches={MINIBATCHES}"]
    applied = run_local_workers(_recording_worker, 1, overrides(tmp_path, *extra), timeout_s=600)[0]
    expected = expected_schedule()
    assert len(applied) == len(expected), applied
    for index, (rates, want) in enumerate(zip(applied, expected)):
        assert len(rates) == 1 and math.isclose(rates[0], want, rel_tol=1e-9, abs_tol=1e-15), (
            f"update {index}: lr {rates} != {want}; all updates {applied}")
    # The logged lr of a step is the rate of its last update.
    logged = [r["lr"] for r in deterministic_records(tmp_path / "run")]
    last_of_each_step = expected[SFT_STEPS + MINIBATCHES - 1 :: MINIBATCHES]
    assert len(logged) == STEPS and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(logged, last_of_each_step)), logged

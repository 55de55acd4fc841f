"""Resuming the RL loop: after ``kill -9`` through the real CLI, and onto another tensor-parallel layout.

A resumed run must log exactly what an uninterrupted run logs (the wall-clock entries aside): the
checkpoint holds the weights, Adam state, scheduler, RNG states, the prompt-stream position and the
async queue, and sampling is seeded by the step.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.e2e.rl_fixtures import (
    REPO,
    cli_env,
    deterministic_records,
    overrides,
    run_worker,
    run_workers,
    train_command,
    tree_digest,
)
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

STEPS = 10
RESUMABLE = [f"train.steps={STEPS}", "checkpoint.save_every=2", "rl.num_minibatches=2", "rl.async_lag=1",
             "rl.sft_warmup_steps=10", "rl.sft_lr=3e-3"]
"""Two mini-batches and a one-step async queue, so the optimizer state and the queue must both survive."""


def _latest_step(ckpt) -> int:
    try:
        return int((ckpt / "latest").read_text().strip())
    except (OSError, ValueError):
        return 0


def test_kill_9_then_resume_logs_what_an_uninterrupted_run_logs(tmp_path):
    reference = overrides(tmp_path, *RESUMABLE, f"logging.run_dir={tmp_path / 'reference'}")
    done = subprocess.run(train_command(reference), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "killed"
    interrupted = overrides(tmp_path, *RESUMABLE, f"logging.run_dir={run_dir}", f"checkpoint.dir={ckpt}")
    proc = subprocess.Popen(train_command(interrupted), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while _latest_step(ckpt) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-3000:]}"
    killed_at = _latest_step(ckpt)
    assert 2 <= killed_at < STEPS

    again = subprocess.run(train_command(interrupted), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _latest_step(ckpt) == STEPS

    expected = deterministic_records(tmp_path / "reference")
    assert [r["step"] for r in expected] == list(range(2, STEPS + 1))  # async_lag=1: step 1 only samples
    assert deterministic_records(run_dir) == expected


def _continue_worker(rank, world_size, overrides_):
    """``run`` from the checkpoint, recording what the first resumed update saw before it changed anything."""
    import vespo_megatron.rl.step as step_module

    seen = {}
    train_on_rollout = step_module.train_on_rollout

    def recording(config, engine, rollout, step):
        results = train_on_rollout(config, engine, rollout, step)
        if not seen:
            seen.update(resumed_step=step, old_logprob_sums=rollout.old_logprob_sums.clone(),
                        first_update_loss=results[0].metrics["loss/value"])
        return results

    step_module.train_on_rollout = recording
    out = run_worker(rank, world_size, overrides_)
    return {**out, **seen}


def test_resume_tp2_checkpoint_with_tp1(tmp_path):
    """A TP=2 run saves at step 4; TP=2 and TP=1 continuations to step 6 both start at step 5 and see the
    same model: the first resumed rollout's old-policy log-prob sums (computed with the loaded weights
    before any update) and the first update's loss agree up to the float noise of a different reduction
    order, and the step metrics stay close (Adam amplifies that noise a little in later updates).

    The padded vocabulary is a multiple of make_vocab_size_divisible_by * tp, and the padding columns are
    part of the softmax the trainer evaluates; both layouts are given the same padded size (112) so that
    they hold the same policy. With different padding the resharded weights are still equal on the real
    vocabulary, but log-probs shift by the extra padding mass (about 0.02 nats per token here)."""
    padding = {2: "model.make_vocab_size_divisible_by=56", 1: "model.make_vocab_size_divisible_by=112"}
    ckpt = tmp_path / "ckpt"
    common = ["rl.num_minibatches=2", "rl.sft_warmup_steps=10", "rl.sft_lr=3e-3", f"checkpoint.dir={ckpt}"]
    first = run_workers(2, overrides(tmp_path, *common, padding[2], "parallel.tp=2", "train.steps=4",
                                     f"logging.run_dir={tmp_path / 'tp2_first'}"))
    assert first[0]["step"] == 4 and first[0]["iteration"] == 8  # 4 steps x 2 mini-batches (warm-up not counted)
    saved = tree_digest(ckpt)

    continued, seen = {}, {}
    for tp in (2, 1):
        ckpt_copy = tmp_path / f"ckpt_tp{tp}"  # each continuation saves into its own copy of the checkpoint
        shutil.copytree(ckpt, ckpt_copy)
        run_dir = tmp_path / f"tp{tp}_continued"
        out = run_local_workers(_continue_worker, tp, overrides(
            tmp_path, *common, padding[tp], f"parallel.tp={tp}", "train.steps=6", f"checkpoint.dir={ckpt_copy}",
            f"logging.run_dir={run_dir}"), timeout_s=900)
        assert out[0]["step"] == 6 and out[0]["iteration"] == 12
        continued[tp], seen[tp] = deterministic_records(run_dir), out[0]
    assert tree_digest(ckpt) == saved

    assert seen[1]["resumed_step"] == seen[2]["resumed_step"] == 4  # the loop's 0-based step index of step 5
    torch.testing.assert_close(seen[1]["old_logprob_sums"], seen[2]["old_logprob_sums"], rtol=0, atol=1e-4)
    assert seen[1]["first_update_loss"] == pytest.approx(seen[2]["first_update_loss"], rel=1e-4, abs=1e-6)
    tp2, tp1 = continued[2], continued[1]
    assert [r["step"] for r in tp1] == [r["step"] for r in tp2] == [5, 6]
    for a, b in zip(tp1, tp2):
        assert a["reward/mean"] == b["reward/mean"]  # same samples: the sampling generator is seeded by step
        assert a["loss/value"] == pytest.approx(b["loss/value"], rel=1e-2, abs=1e-5)

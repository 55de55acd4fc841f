"""The KL reference is the policy as RL starts, and it survives a checkpoint/resume exactly."""

import json

import pytest

from vespo_megatron.config import load_config
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

OVERRIDES = [
    "model.max_seq_length=16", "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=4",
    "rl.num_minibatches=2", "train.micro_batch_size=4", "optimizer.lr=3e-3", "task.options={max_operand: 5, seed: 3}",
    "rl.sft_warmup_steps=5", "rl.kl_coef=0.5", "parallel.tp=1", "logging.progress_bar=false",
    "logging.tensorboard=false", "checkpoint.save_every=2",
]  # fmt: skip


def _run(rank, world, extra):
    from vespo_megatron.rl.loop import run

    run(load_config("configs/tiny_dense_cpu.yaml", OVERRIDES + extra))


def _kl_series(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["kl/ref_k1_per_token"] for line in lines if "kl/ref_k1_per_token" in line]


def test_kl_starts_at_zero_grows_and_resumes_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_local_workers(_run, 1, ["train.steps=4", f"logging.run_dir={full}", f"checkpoint.dir={full}/ckpt"])
    run_local_workers(_run, 1, ["train.steps=2", f"logging.run_dir={part}", f"checkpoint.dir={part}/ckpt"])
    run_local_workers(_run, 1, ["train.steps=4", f"logging.run_dir={part}", f"checkpoint.dir={part}/ckpt"])
    expected = _kl_series(full)
    assert len(expected) == 4
    assert expected[0] == 0.0  # the reference is exactly the policy that sampled the first rollout
    assert expected[-1] > 0.0
    assert _kl_series(part) == expected

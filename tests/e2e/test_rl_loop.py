"""The RL loop end to end on the real Megatron-Core stack (one or two gloo workers, tiny model).

What is checked: VESPO raises the sampled reward; external JSONL rollouts train and the TIS correction
acts on them; stale mini-batches and the async lag use the sampling policy as the behaviour policy;
bad input fails with a clear error and leaves the last checkpoint as it was; ``vespo-megatron demo``.
Kill/resume and resharding on resume are in test_resume.py. Shared settings: rl_fixtures.py.
"""

from __future__ import annotations

import json

import re
import shutil
import statistics

import pytest

from tests.e2e.rl_fixtures import (
    deterministic_records,
    load,
    overrides,
    run_cli,
    run_workers,
    tree_digest,
    write_jsonl,
)
from vespo_megatron.runtime.local_workers import WorkerError, run_local_workers

# ------------------------------------------------------------------------------------ 1. learning

LEARNING = [
    "task.options={max_operand: 3, seed: 3}",
    "rollout.prompts_per_step=8",
    "rollout.group_size=8",
    "train.micro_batch_size=16",
    "rl.num_minibatches=2",
    "rl.sft_warmup_steps=60",
    "rl.sft_lr=3e-3",
    "optimizer.lr=1e-3",
    "train.steps=80",
]
WINDOW = 20
MARGIN = 0.06


def test_vespo_raises_the_sampled_reward(tmp_path):
    """After a 60-step supervised warm-up the policy answers about half of the sampled problems
    (operands 0-3, + and -); 80 VESPO steps with 2 stale mini-batches each take it to about two thirds.

    The check compares the mean sampled reward (accuracy: reward is 1 for the exact answer) of the last
    20 steps with the first 20. Each step samples 64 responses (8 prompts x 8); the per-step reward
    varies mostly with the prompt mix (step-to-step std 0.06 early, 0.15 late), so the standard error
    of the difference of the two window means is about 0.04. With these seeds the windows give
    0.469 -> 0.661 (+0.19, about 4.5 standard errors; the run is deterministic on one worker; measured with
    the KV-cache sampler's per-position uniforms, contiguous whole-group mini-batches, VESPO's
    micro-token-mean and the scheduled lr from the first RL update). The margin of 0.06 is 1.5 standard
    errors above a policy that does not learn and leaves 0.13 of room below the observed rise for numerical
    drift (other thread counts, library versions).
    """
    history = run_workers(1, overrides(tmp_path, *LEARNING), timeout_s=900)[0]["history"]
    assert len(history) == 80
    first, last = statistics.mean(history[:WINDOW]), statistics.mean(history[-WINDOW:])
    assert last > first + MARGIN, f"sampled reward {first:.3f} -> {last:.3f}; history {history}"


# ------------------------------------------------------------------------------ 2. external JSONL


def _synthetic_rollouts(path, sampler_logprob: float):
    """Four groups of four: a prompt "a+b=" and responses that are right or wrong, with made-up sampler log-probs."""
    from vespo_megatron.tokenizer import load_tokenizer

    tok = load_tokenizer()
    records = []
    for a, b in ((1, 2), (3, 1), (2, 2), (0, 3)):
        prompt = [tok.bos_id] + tok.encode(f"{a}+{b}=")
        for guess in (a + b, a + b + 1, a + b, a):
            response = tok.encode(str(guess)) + [tok.eos_id]
            records.append({"prompt_tokens": prompt, "response_tokens": response,
                            "sampler_logprobs": [sampler_logprob] * len(response),
                            "reward": float(guess == a + b)})
    return write_jsonl(path, records)


def test_external_jsonl_rollouts_train_and_tis_corrects_the_sampler_mismatch(tmp_path):
    """With one mini-batch per step the trainer's old log-probs equal the current ones, so log W is 0
    unless the train/inference correction adds ``min(log pi_old - log mu_sampler, log C)``. The made-up
    sampler log-probs (-0.5 per token) are far from the untrained model's (about -log V), so TIS makes
    log W clearly non-zero and changes the loss."""
    path = _synthetic_rollouts(tmp_path / "rollouts.jsonl", sampler_logprob=-0.5)
    common = ["rollout.source=jsonl", f"rollout.jsonl_path={path}", "train.steps=3"]
    runs = {}
    for mode in ("none", "tis"):
        run_dir = tmp_path / mode
        out = run_workers(1, overrides(tmp_path, *common, f"loss.correction.mode={mode}",
                                       f"logging.run_dir={run_dir}"))[0]
        assert out["step"] == 3 and out["iteration"] == 3
        runs[mode] = deterministic_records(run_dir)
    none, tis = runs["none"], runs["tis"]
    assert [r["step"] for r in none] == [1, 2, 3]
    # Rewards come from the file: groups 1, 2 and 4 have 2 of 4 right, group 3 has 2 of 4 right.
    assert all(r["reward/mean"] == 0.5 for r in none + tis)
    assert all(r["vespo/abs_log_w_mean"] < 1e-5 for r in none)
    assert all(r["vespo/abs_log_w_mean"] > 0.5 for r in tis)
    assert none[0]["loss/value"] != pytest.approx(tis[0]["loss/value"], rel=1e-3)
    assert none[0]["vespo/phi_mean"] != pytest.approx(tis[0]["vespo/phi_mean"], rel=1e-3)


# ------------------------------------------------------------------------------------ 3. staleness


WARM = ["rl.sft_warmup_steps=20", "rl.sft_lr=3e-3", "optimizer.lr=1e-2"]
"""A short supervised warm-up, so that some groups have mixed rewards (non-zero advantages, real updates)."""


def _warm_trainer(overrides_):
    from vespo_megatron.rl.loop import build_trainer
    from vespo_megatron.rl.warmup import supervised_warmup

    config = load(overrides_)
    trainer = build_trainer(config)
    supervised_warmup(trainer.context, config.rl.sft_warmup_steps)
    return trainer


def _staleness_worker(rank, world_size, overrides_):
    from vespo_megatron.rl.step import next_local_rollout, train_on_rollout

    trainer = _warm_trainer(overrides_)
    rollout = next_local_rollout(trainer.context, trainer.state)
    results = train_on_rollout(trainer.context.config, trainer.context.engine, rollout, step=0)
    vectors = [[report["seq/log_w"] for report in result.reported] for result in results]
    return vectors, float(rollout.advantages.abs().sum())


def test_minibatches_use_the_sampling_policy_as_behaviour_policy(tmp_path):
    """Old log-probs are computed with the sampling weights, so the first of N mini-batches sees
    log W = 0 (same weights, same computation up to float noise) and every later one sees the drift of
    the updates before it."""
    per_minibatch, advantage_mass = run_local_workers(
        _staleness_worker, 1, overrides(tmp_path, "rl.num_minibatches=4", *WARM), timeout_s=900)[0]
    assert advantage_mass > 0, "no group with mixed rewards: the updates would not move the policy"
    assert len(per_minibatch) == 4
    import torch

    drift = [float(torch.cat(vectors).abs().max()) for vectors in per_minibatch]
    assert drift[0] < 1e-5, drift
    assert all(d > 1e-3 for d in drift[1:]), drift


def test_sampler_temperature_puts_its_mismatch_into_log_w(tmp_path):
    """rollout.sampler_temperature with loss.behaviour=sampler: mu is the sampler's log-prob at its own
    temperature and pi the trainer's at rollout.temperature, so the first step's log W (no update yet) is the
    mismatch alone: zero up to rounding when both temperatures agree, large when they differ."""
    from vespo_megatron.metrics import read_metrics

    measured = {}
    for name, extra in (("same", []), ("hot", ["rollout.sampler_temperature=2.0"])):
        run_dir = tmp_path / name
        run_workers(1, overrides(tmp_path, "loss.name=vespo", "loss.behaviour=sampler", "train.steps=1",
                                 "rl.num_minibatches=1", f"logging.run_dir={run_dir}", *extra))
        measured[name] = read_metrics(run_dir / "metrics.jsonl")[0]
    for key in ("mismatch/seq_abs_log_ratio_mean", "vespo/abs_log_w_mean"):
        assert measured["same"][key] < 1e-4, (key, measured["same"][key])
        # The untrained tiny model is nearly uniform over its vocabulary, so temperature moves each token's
        # log-prob by a few hundredths; over a 4-token response that is far above the rounding of "same".
        assert measured["hot"][key] > 0.05, (key, measured["hot"][key])


def _async_worker(rank, world_size, overrides_):
    from vespo_megatron.rl.step import run_step

    trainer = _warm_trainer(overrides_)
    out = []
    for _ in range(6):
        out.append(run_step(trainer.context, trainer.state))
        trainer.state.step += 1
    return out


def test_async_lag_trains_on_rollouts_from_k_steps_earlier(tmp_path):
    """With rl.async_lag=K the first K steps only sample; from then on each step trains on the rollout
    sampled K steps earlier. The policy lag (optimizer updates between sampling and the update, N per
    trained step) ramps up as N*min(s-K, K) while the queue fills (no updates happen during the first
    K steps) and then stays at K*N; it is what ``staleness/policy_lag`` reports and log W reflects."""
    steps = run_local_workers(_async_worker, 1, overrides(tmp_path, "rl.async_lag=2", "rl.num_minibatches=2", *WARM),
                              timeout_s=900)[0]
    assert steps[0] is None and steps[1] is None
    assert [m["staleness/policy_lag"] for m in steps[2:]] == [0.0, 2.0, 4.0, 4.0]  # K=2, N=2
    for metrics in steps[3:]:
        assert metrics["vespo/abs_log_w_mean"] > 1e-4  # even the first mini-batch is off-policy


# ----------------------------------------------------------------------------------- 4. bad input


def _expect_worker_error(overrides_, *fragments):
    with pytest.raises(WorkerError) as err:
        run_workers(1, overrides_)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_malformed_rollout_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"prompt_tokens": [2, 5], "response_tokens": [6], "sampler_logprobs": [-1.0], "reward": 1}\n'
                    '{"prompt_tokens": [2, 5], "response_tokens": \n')
    _expect_worker_error(overrides(tmp_path, "rollout.source=jsonl", f"rollout.jsonl_path={path}"),
                         f"{path}:2: malformed JSON")


def test_prompt_longer_than_the_context_names_the_fix(tmp_path):
    # Four operands ("12+7-3+4=") plus bos take 12 tokens: more than the whole 9-token context (8 + 1).
    _expect_worker_error(
        overrides(tmp_path, "model.max_seq_length=8",
                  "task.options={max_operand: 20, num_operands: 4, seed: 3}"),
        "leaves no room in the context of 9 tokens", "raise model.max_seq_length")
    # A prompt that fits but leaves less than rollout.max_new_tokens.
    _expect_worker_error(
        overrides(tmp_path, "model.max_seq_length=16", "rollout.max_new_tokens=8",
                  "task.options={max_operand: 20, num_operands: 4, seed: 3}"),
        "rollout.max_new_tokens=8 exceeds the context of 17 tokens", "raise model.max_seq_length")


def test_empty_prompt_dataset_and_empty_rollout_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _expect_worker_error(
        overrides(tmp_path, "task.name=jsonl",
                  f"task.options={{path: {empty}, reward_fn: 'tests.e2e.bad_rewards:exact'}}"),
        "holds no records")
    _expect_worker_error(overrides(tmp_path, "rollout.source=jsonl", f"rollout.jsonl_path={empty}"),
                         "no rollouts in the file")


def test_failures_leave_the_last_checkpoint_intact(tmp_path):
    """A run saves a checkpoint; resume attempts with a reward that raises, a reward that returns NaN
    and a missing tokenizer each fail with a message naming the cause, and the checkpoint directory
    (and the metrics written so far) stay byte for byte as they were and still resume."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)])
    ckpt = tmp_path / "ckpt"

    def attempt(reward: str, *extra: str) -> list[str]:
        return overrides(tmp_path, "task.name=jsonl",
                         f"task.options={{path: {prompts}, reward_fn: 'tests.e2e.bad_rewards:{reward}', seed: 1}}",
                         f"checkpoint.dir={ckpt}", *extra)

    first = run_workers(1, attempt("exact", "train.steps=2"))[0]
    assert first["step"] == 2
    saved = tree_digest(ckpt)
    assert "latest" in saved and any(name.startswith("step_00000002/") for name in saved)
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()

    _expect_worker_error(attempt("raises", "train.steps=4"),
                         "tests.e2e.bad_rewards:raises raised KeyError")
    _expect_worker_error(attempt("returns_nan", "train.steps=4"),
                         "tests.e2e.bad_rewards:returns_nan returned nan")
    _expect_worker_error(attempt("exact", "train.steps=4", "task.tokenizer=/nonexistent/tok.model"),
                         "tokenizer model '/nonexistent/tok.model' does not exist")
    assert tree_digest(ckpt) == saved
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before

    resumed = run_workers(1, attempt("exact", "train.steps=3"))[0]
    assert resumed["step"] == 3 and resumed["iteration"] == 3
    assert [r["step"] for r in deterministic_records(tmp_path / "run")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------- 5. demo


@pytest.mark.slow
def test_demo_cli_smoke(tmp_path):
    """``vespo-megatron demo --steps 3`` (two TP workers) with a shortened warm-up and evaluation."""
    command = shutil.which("vespo-megatron")
    args = [command] if command else [__import__("sys").executable, "-m", "vespo_megatron.cli"]
    result = run_cli(args + ["demo", "--steps", "3", "--run-dir", str(tmp_path / "demo"),
                             "rl.sft_warmup_steps=4", "rl.eval_prompts=16", "logging.progress_bar=false"],
                     timeout_s=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"demo: reward \d\.\d{3} -> \d\.\d{3}", last), result.stdout
    assert len(deterministic_records(tmp_path / "demo")) >= 3
    info = json.loads((tmp_path / "demo" / "run_info.json").read_text())  # the decode path, recorded once
    assert info["decode_path"] == "lean" and "local layer spec" in info["decode_path_reason"], info
    # Megatron's CPU start-up notices (apex/TE fallbacks, CUDA_DEVICE_MAX_CONNECTIONS, cuda graph scope,
    # the rerun state machine) stay out of the demo's output.
    output = result.stdout + result.stderr
    for notice in ("Apex", "CUDA_DEVICE_MAX_CONNECTIONS", "full scope is deprecated", "Rerun State Machine",
                   "RerunStateMachine", "GPTModel IS DEPRECATED", "No CUDA runtime"):
        assert notice not in output, (notice, output[-3000:])

"""Disaggregated (truly asynchronous) RL end to end: rollout workers and trainers in one gloo job.

What is checked:
1. with a sync after every update and no lookahead, a 1-trainer + 1-worker job reproduces the
   colocated single-process run bit for bit (every metric, the final weights);
2. with rl.max_staleness=2 and workers running further ahead than the bound allows, rollouts are
   dropped and counted, and every trained sequence is at most 2 versions old (some are older than 0);
3. a rollout worker killed with SIGKILL, or one that stops answering (SIGSTOP: no heartbeat), makes the
   trainer fail within rl.worker_timeout_s with an error naming the worker's rank, and the job resumes from
   the last checkpoint; a worker that is only slow is waited for beyond the timeout;
4. SIGUSR1 on the trainer checkpoints the steps the workers had sampled ahead (with their versions), and the
   resumed run logs the same metrics as an uninterrupted one;
5. loss.behaviour=sampler takes mu from the sampler's log-probs (here an external JSONL file).
"""

from __future__ import annotations

import os
from pathlib import Path
import signal
import time

import pytest
import torch

from tests.e2e.rl_fixtures import deterministic_records, load, overrides
from vespo_megatron.runtime.local_workers import WorkerError, run_local_workers

pytestmark = pytest.mark.slow

SPLIT = ["parallel.rollout_ranks=1", "rl.worker_timeout_s=60"]
STALE_KEYS = ("sync/",)


def _run_and_weights(rank, world_size, overrides_):
    """Run the RL loop; a trainer rank returns its history and its final weights (CPU copies)."""
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.rl.loop import run

    result = run(load(overrides_))
    if result.role == "rollout":
        return {"role": "rollout", "step": result.steps}
    weights = {}
    for index, chunk in enumerate(result.context.engine.chunks):
        for name, value in unwrap(chunk).state_dict().items():
            if torch.is_tensor(value):
                weights[f"{index}.{name}"] = value.detach().clone()
    return {"role": "trainer", "history": result.state.history, "step": result.state.step, "weights": weights}


def _records(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(STALE_KEYS)} for r in deterministic_records(run_dir)]


def test_disaggregated_staleness_zero_reproduces_colocated(tmp_path):
    # the same algorithm on both sides: mu recomputed by the trainer (exact at lag 0, which K=0 enforces)
    common = ["train.steps=3", "rl.max_staleness=0", "rl.num_minibatches=2", "train.micro_batch_size=2",
              "loss.behaviour=recompute"]
    colocated = run_local_workers(_run_and_weights, 1, overrides(tmp_path / "colocated", *common),
                                  timeout_s=600)[0]
    split = run_local_workers(_run_and_weights, 2, overrides(tmp_path / "split", *common, *SPLIT, "rl.sync_every=1"),
                              timeout_s=600)
    trainer, worker = split
    assert worker["role"] == "rollout" and trainer["role"] == "trainer"
    reference = _records(tmp_path / "colocated" / "run")
    assert len(reference) == 3
    assert _records(tmp_path / "split" / "run") == reference
    assert trainer["weights"].keys() == colocated["weights"].keys()
    for name, value in colocated["weights"].items():
        assert torch.equal(trainer["weights"][name], value), name


def test_bounded_staleness_drops_and_counts(tmp_path):
    # Workers 3 steps ahead with one update per step reach staleness 3 > K=2 every fourth step.
    extra = ["train.steps=5", "rl.max_staleness=2", "rl.lookahead=3", *SPLIT]
    run_local_workers(_run_and_weights, 2, overrides(tmp_path, *extra), timeout_s=600)
    records = deterministic_records(tmp_path / "run")
    assert len(records) == 5
    histogram: dict[int, float] = {}
    for record in records:
        assert not any(k.startswith("staleness/hist_3") for k in record), record
        for lag in range(3):
            histogram[lag] = histogram.get(lag, 0.0) + record[f"staleness/hist_{lag}"]
        assert record["staleness/max"] <= 2
    assert histogram[1] + histogram[2] > 0, histogram
    assert sum(histogram.values()) == 5 * 16  # every trained sequence counted once
    assert records[-1]["staleness/dropped_rollouts_total"] >= 1
    assert sum(r["staleness/dropped_rollouts"] for r in records) == records[-1]["staleness/dropped_rollouts_total"]


def _killed_worker(rank, world_size, overrides_, kill_at_step):
    """The RL loop, except that the rollout worker SIGKILLs itself when it reaches ``kill_at_step``."""
    from vespo_megatron.rl import worker

    original = worker.RolloutWorker._generate

    def generate(self, step):
        if step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step)

    worker.RolloutWorker._generate = generate
    return _run_and_weights(rank, world_size, overrides_)


def _stopped_worker(rank, world_size, overrides_, stop_at_step):
    """The RL loop, except that the rollout worker SIGSTOPs itself (heartbeat included) at ``stop_at_step``."""
    from vespo_megatron.rl import worker

    original = worker.RolloutWorker._generate

    def generate(self, step):
        if step == stop_at_step:
            os.kill(os.getpid(), signal.SIGSTOP)
        return original(self, step)

    worker.RolloutWorker._generate = generate
    return _run_and_weights(rank, world_size, overrides_)


def _slow_worker(rank, world_size, overrides_, slow_step, seconds):
    """The RL loop, except that the rollout worker takes ``seconds`` longer over step ``slow_step``."""
    from vespo_megatron.rl import worker

    original = worker.RolloutWorker._generate

    def generate(self, step):
        if step == slow_step:
            time.sleep(seconds)
        return original(self, step)

    worker.RolloutWorker._generate = generate
    return _run_and_weights(rank, world_size, overrides_)


def test_silent_worker_fails_within_the_timeout_naming_it_on_every_trainer_rank(tmp_path):
    """A stopped worker (SIGSTOP: connection open, no heartbeat) is an error naming it on both trainer ranks."""
    extra = ["train.steps=6", "parallel.rollout_ranks=1", "rl.worker_timeout_s=8", "train.micro_batch_size=2"]
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        run_local_workers(_stopped_worker, 3, overrides(tmp_path, *extra), 2, timeout_s=300)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert "rank 2 has sent no heartbeat" in message and "rl.worker_timeout_s=8" in message, message[-2000:]
    assert elapsed < 8 + 60, elapsed


def test_busy_worker_is_waited_for_beyond_the_timeout(tmp_path):
    """A worker alive but 12 s over one step with rl.worker_timeout_s=4: the run completes, nothing dropped."""
    extra = ["train.steps=4", "parallel.rollout_ranks=1", "rl.worker_timeout_s=4", "rl.max_staleness=1"]
    trainer = run_local_workers(_slow_worker, 2, overrides(tmp_path, *extra), 2, 12.0, timeout_s=300)[0]
    assert trainer["step"] == 4
    assert _trained_indices(tmp_path / "run") == [0, 1, 2, 3]


def test_killed_worker_fails_fast_naming_it_then_resume_continues(tmp_path):
    ckpt = tmp_path / "ckpt"
    extra = ["train.steps=6", "checkpoint.save_every=2", f"checkpoint.dir={ckpt}", "rl.max_staleness=1",
             "parallel.rollout_ranks=1", "rl.worker_timeout_s=20"]
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        run_local_workers(_killed_worker, 2, overrides(tmp_path, *extra), 4, timeout_s=300)
    elapsed = time.monotonic() - started
    assert "rollout worker rank 1" in str(failure.value), str(failure.value)[-2000:]
    assert elapsed < 20 + 60, elapsed  # start-up, a few steps, then at most the timeout
    assert (ckpt / "latest").read_text().strip() == "2"
    resumed = run_local_workers(_run_and_weights, 2, overrides(tmp_path, *extra), timeout_s=600)[0]
    assert resumed["step"] == 6
    steps = [r["step"] for r in deterministic_records(tmp_path / "run")]
    assert steps == list(range(1, 7))


def _trainer_signalling_itself(rank, world_size, overrides_, at_step, signum=signal.SIGUSR1):
    """The RL loop, except that the trainer sends itself ``signum`` as it starts step ``at_step`` (1-based)."""
    from vespo_megatron.rl import loop

    original = loop.run_step

    def run_step(context, state, *args, **kwargs):
        if state.step + 1 == at_step:
            os.kill(os.getpid(), signum)
        return original(context, state, *args, **kwargs)

    loop.run_step = run_step
    return _run_and_weights(rank, world_size, overrides_)


def _signalled_trainer(rank, world_size, overrides_, signal_at_step):
    """SIGUSR1 (checkpoint and stop) during step ``signal_at_step``."""
    return _trainer_signalling_itself(rank, world_size, overrides_, signal_at_step)


def test_sigusr1_checkpoints_the_sampled_ahead_steps_and_resume_reproduces(tmp_path):
    from vespo_megatron.checkpoint import load_weights_only

    common = ["train.steps=4", "rl.max_staleness=1", *SPLIT]
    whole = tmp_path / "whole"
    run_local_workers(_run_and_weights, 2, overrides(whole, *common), timeout_s=600)
    parts = tmp_path / "parts"
    part_overrides = overrides(parts, *common, f"checkpoint.dir={parts / 'ckpt'}")
    stopped = run_local_workers(_signalled_trainer, 2, part_overrides, 2, timeout_s=600)[0]
    assert stopped["step"] == 2
    saved = load_weights_only(parts / "ckpt" / "step_00000002" / "ranks" / "rank_00000.pt")["extra_state"]
    assert saved["remote"]["next_index"] == 2
    assert [f["index"] for f in saved["remote"]["buffer"]] == [2]  # lookahead 1: step 2 was already sampled
    assert saved["remote"]["buffer"][0]["version"] == 1
    run_local_workers(_run_and_weights, 2, part_overrides, timeout_s=600)
    assert _records(parts / "run") == _records(whole / "run")


def test_sampler_behaviour_takes_mu_from_external_rollouts(tmp_path):
    """External JSONL rollouts with made-up sampler log-probs (-0.5 per token, far from the untrained model's
    about -log V). With ``recompute`` and one mini-batch, mu is the current policy and log W is 0; with
    ``sampler``, mu is the file's log-probs: log W = S - sum(-0.5) is large, and a TIS correction has nothing
    left to correct (the same run as without it)."""
    from tests.e2e.rl_fixtures import run_workers
    from tests.e2e.test_rl_loop import _synthetic_rollouts

    path = _synthetic_rollouts(tmp_path / "rollouts.jsonl", sampler_logprob=-0.5)
    common = ["rollout.source=jsonl", f"rollout.jsonl_path={path}", "train.steps=2"]
    runs = {}
    for name, extra in {"recompute": ["loss.behaviour=recompute"], "sampler": ["loss.behaviour=sampler"],
                        "sampler_tis": ["loss.behaviour=sampler", "loss.correction.mode=tis"]}.items():
        run_workers(1, overrides(tmp_path, *common, *extra, f"logging.run_dir={tmp_path / name}"))
        runs[name] = deterministic_records(tmp_path / name)
    assert all(r["vespo/abs_log_w_mean"] < 1e-5 for r in runs["recompute"])
    assert all(r["vespo/abs_log_w_mean"] > 1.0 for r in runs["sampler"])
    assert runs["sampler_tis"] == runs["sampler"]


# ------------------------------------------------------------------ lossless at lookahead >= 2


def _killed_trainer(rank, world_size, overrides_, kill_at_step):
    """SIGKILL (no checkpoint, no goodbye) as the trainer starts step ``kill_at_step``."""
    return _trainer_signalling_itself(rank, world_size, overrides_, kill_at_step, signal.SIGKILL)


def _trained_indices(run_dir) -> list[int]:
    return [int(r["rl/step_index"]) for r in deterministic_records(run_dir)]


@pytest.mark.parametrize("lookahead, interruption", [(2, "sigusr1"), (3, "sigkill")])
def test_lookahead_saves_every_step_and_resumes_without_losing_a_step(tmp_path, lookahead, interruption):
    """Workers ``lookahead`` steps ahead, a checkpoint after every step, an interruption at step 4: the
    resumed run trains RL steps 0..T-1 exactly once each and logs what an uninterrupted run logs."""
    steps = 7
    common = [f"train.steps={steps}", f"rl.max_staleness={lookahead}", f"rl.lookahead={lookahead}",
              "checkpoint.save_every=1", *SPLIT]
    whole = tmp_path / "whole"
    trainer = run_local_workers(_run_and_weights, 2, overrides(whole, *common, f"checkpoint.dir={whole / 'ckpt'}"),
                                timeout_s=600)[0]
    assert _trained_indices(whole / "run") == list(range(steps))
    assert all(r["staleness/dropped_rollouts"] == 0 for r in deterministic_records(whole / "run"))
    parts = tmp_path / "parts"
    part_overrides = overrides(parts, *common, f"checkpoint.dir={parts / 'ckpt'}")
    if interruption == "sigusr1":
        stopped = run_local_workers(_signalled_trainer, 2, part_overrides, 4, timeout_s=600)[0]
        assert stopped["step"] == 4
    else:
        with pytest.raises(WorkerError):
            run_local_workers(_killed_trainer, 2, part_overrides, 4, timeout_s=600)
    latest = int((parts / "ckpt" / "latest").read_text())
    assert latest == (4 if interruption == "sigusr1" else 3)
    from vespo_megatron.checkpoint import load_weights_only

    saved = load_weights_only(parts / "ckpt" / f"step_{latest:08d}" / "ranks" / "rank_00000.pt")["extra_state"]
    assert [f["index"] for f in saved["remote"]["buffer"]] == list(range(latest, latest + lookahead))
    resumed = run_local_workers(_run_and_weights, 2, part_overrides, timeout_s=600)[0]
    assert resumed["step"] == steps
    assert _trained_indices(parts / "run") == list(range(steps))
    assert _records(parts / "run") == _records(whole / "run")
    for name, value in trainer["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


def test_a_step_out_of_order_is_an_error_naming_both_indices():
    """The trainer checks every step's index and version, buffered or received."""
    from types import SimpleNamespace

    from vespo_megatron.rl.weight_sync import WorkerFailure
    from vespo_megatron.rl.remote import RemoteRollouts

    remote = RemoteRollouts.__new__(RemoteRollouts)
    remote.config = load(overrides(Path("/tmp"), "rl.lookahead=2", "parallel.rollout_ranks=1"))
    remote.split = SimpleNamespace(rollout_ranks=(1,))
    remote.pushes, remote.unverified_before, remote.next_index = [(-1, 0), (0, 1), (1, 2)], 0, 3
    remote.buffer = [{"index": 4, "version": 1}]
    with pytest.raises(WorkerFailure, match="sent RL step 4, expected 3"):
        remote.next_fields()
    remote.buffer = [{"index": 3, "version": 2}]
    with pytest.raises(WorkerFailure, match="sampled with policy version 2, expected 1"):
        remote.next_fields()
    remote.buffer = [{"index": 3, "version": 1}]
    assert remote.next_fields()["index"] == 3 and remote.next_index == 4


# ------------------------------------------------ weights leave the optimizer gathered (DP 2, distributed optimizer)


def _received_weights_run(rank, world_size, overrides_):
    """The RL loop; the rollout worker keeps a copy of its weights after every sync it receives."""
    from vespo_megatron.rl import weight_sync

    received = []
    original = weight_sync.WorkerSync.receive

    def receive(self):
        out = original(self)
        received.append({name: param.detach().clone() for name, (_, param) in self.local.items()})
        return out

    weight_sync.WorkerSync.receive = receive
    result = _run_and_weights(rank, world_size, overrides_)
    result["received"] = received
    return result


def test_overlap_param_gather_pushes_exports_and_saves_the_updated_weights(tmp_path):
    """Trainer DP 2 with the distributed optimizer: with ``overlap_param_gather`` (parameters gathered lazily by
    the next forward) the weights every push delivers, every HF export and every checkpoint equal those of the
    same run with a synchronous gather in the optimizer step, bit for bit."""
    from tests.e2e.rl_fixtures import tree_digest
    from tests.hf_fixtures import build_hf_model

    hf_dir = build_hf_model(tmp_path / "hf", "qwen3", hidden_size=64, intermediate_size=128, head_dim=16)
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}"
        extra = [f"model.hf_path={hf_dir}", "train.steps=3", "rl.max_staleness=1", "checkpoint.save_every=1",
                 "checkpoint.export_hf_every=1", "checkpoint.keep_last=5", f"checkpoint.dir={out / 'ckpt'}", "train.micro_batch_size=2",
                 "optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true",
                 f"optimizer.overlap_param_gather={str(overlap).lower()}", "optimizer.lr=1e-2",
                 "optimizer.weight_decay=0.1", *SPLIT]  # decay moves every weight even where rewards tie
        results = run_local_workers(_received_weights_run, 3, overrides(out, *extra), timeout_s=600)
        runs[overlap] = {"worker": results[2], "trainers": results[:2], "dir": out}
    synchronous, lazy = runs[False], runs[True]
    assert len(lazy["worker"]["received"]) == 3  # the start, then after updates 1 and 2 (none after the last)
    for step, (want, got) in enumerate(zip(synchronous["worker"]["received"], lazy["worker"]["received"])):
        for name, value in want.items():
            assert torch.equal(got[name], value), f"push {step}: {name}"
    first, last = lazy["worker"]["received"][0], lazy["worker"]["received"][-1]
    assert any(not torch.equal(first[n], last[n]) for n in first), "no update reached the worker"
    for trainer in lazy["trainers"]:
        for name, value in trainer["weights"].items():
            assert torch.equal(value, synchronous["trainers"][0]["weights"][name]), name
    for step in (1, 2, 3):
        want = tree_digest(synchronous["dir"] / "ckpt" / "hf" / f"step_{step:08d}")
        assert want and tree_digest(lazy["dir"] / "ckpt" / "hf" / f"step_{step:08d}") == want, step
        tensors = [{k: v for k, v in tree_digest(run["dir"] / "ckpt" / f"step_{step:08d}").items()
                    if k.endswith(".distcp")} for run in (synchronous, lazy)]  # the saved tensors' bytes
        assert tensors[0] and tensors[1] == tensors[0], step


def test_recompute_with_lag_and_no_correction_is_refused():
    from vespo_megatron.config import validate
    from vespo_megatron.config.errors import ConfigError

    base = overrides(Path("/tmp"), "parallel.rollout_ranks=1", "rl.max_staleness=2")
    assert load(base).loss.behaviour == "sampler"  # the default in disaggregated mode
    assert load(overrides(Path("/tmp"))).loss.behaviour == "recompute"  # and colocated
    with pytest.raises(ConfigError, match="loss.behaviour=recompute with rollouts up to 2 versions behind"):
        validate(load(base + ["loss.behaviour=recompute"]), 2)
    for accepted in (["loss.correction.mode=tis"], ["loss.allow_uncorrected_lag=true"], ["rl.max_staleness=0"]):
        validate(load(base + ["loss.behaviour=recompute", *accepted]), 2)


def test_default_disaggregated_run_puts_the_lag_into_log_w_and_reports_the_mismatch(tmp_path):
    """Default behaviour (the sampler's log-probs as mu), workers 2 steps ahead: at lag 0 log W and the mismatch
    metrics are float noise (same weights on both sides, fp32 CPU); at lag 2 both span the policy change. A
    colocated token-level run reports the per-token mismatch as noise too."""
    # weight decay moves the weights every update even where the tiny model's rewards tie
    moving = ["optimizer.lr=1e-2", "optimizer.weight_decay=0.5"]
    run_local_workers(_run_and_weights, 2, overrides(tmp_path / "split", "train.steps=4", "rl.max_staleness=2",
                                                     *moving, *SPLIT), timeout_s=600)
    records = deterministic_records(tmp_path / "split" / "run")
    assert [r["staleness/policy_lag"] for r in records] == [0.0, 1.0, 2.0, 2.0]
    fresh, stale = records[0], records[-1]
    assert fresh["mismatch/seq_abs_log_ratio_max"] < 1e-4 and fresh["vespo/abs_log_w_mean"] < 1e-4, fresh
    assert stale["vespo/abs_log_w_mean"] > 100 * max(fresh["vespo/abs_log_w_mean"], 1e-6), stale
    assert stale["mismatch/seq_abs_log_ratio_mean"] == pytest.approx(stale["vespo/abs_log_w_mean"], rel=1e-4)
    run_local_workers(_run_and_weights, 1, overrides(tmp_path / "colocated", "train.steps=2", "loss.name=grpo",
                                                     *moving), timeout_s=600)
    for record in deterministic_records(tmp_path / "colocated" / "run"):
        assert record["mismatch/token_abs_log_ratio_max"] < 1e-5, record
        assert abs(record["mismatch/kl_k1_per_seq"]) < 1e-4, record


def _mismatch_by_own_forward(rank, world_size, overrides_):
    """The RL loop with the mismatch metrics' trainer log-probs from a forward pass of their own, never from
    the update."""
    from vespo_megatron.rl import behaviour, step

    behaviour.update_measures_mismatch = step.update_measures_mismatch = lambda config, engine: False
    return _run_and_weights(rank, world_size, overrides_)


@pytest.mark.parametrize("loss", ["vespo", "grpo"])
def test_mismatch_from_the_update_equals_a_forward_pass_of_its_own(tmp_path, loss):
    """With one mini-batch the update's own forward gives the mismatch metrics (no extra pass): the same
    numbers as the separate forward at the weights the rollout enters training with, at lag 2."""
    common = ["train.steps=4", "rl.max_staleness=2", "optimizer.lr=1e-2", "optimizer.weight_decay=0.5",
              f"loss.name={loss}", *SPLIT]
    run_local_workers(_run_and_weights, 2, overrides(tmp_path / "update", *common), timeout_s=600)
    run_local_workers(_mismatch_by_own_forward, 2, overrides(tmp_path / "forward", *common), timeout_s=600)
    from_update = deterministic_records(tmp_path / "update" / "run")
    from_forward = deterministic_records(tmp_path / "forward" / "run")
    assert len(from_update) == len(from_forward) == 4
    for a, b in zip(from_update, from_forward):
        keys = sorted(k for k in b if k.startswith("mismatch/"))
        assert keys and keys == sorted(k for k in a if k.startswith("mismatch/"))
        for key in keys:  # fp32 sums of tens of nats summed in another order: differences ~1e-6
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
    assert from_update[-1]["mismatch/seq_abs_log_ratio_mean"] > 1e-3  # the lag is in it: not two zeros compared


def _counting_decodes(rank, world_size, overrides_):
    """The RL loop; a rollout worker counts its calls into the sampler."""
    from vespo_megatron.rl import worker

    calls = []
    original = worker.sample_and_score

    def sample_and_score(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    worker.sample_and_score = sample_and_score
    result = _run_and_weights(rank, world_size, overrides_)
    result["decodes"] = len(calls)
    return result


def test_worker_decodes_all_trainer_shares_in_one_batch_and_samples_what_colocated_ranks_sample(tmp_path):
    """Trainer DP 2: the worker runs one decode per step for both shares; at lag 0 the run trains exactly what
    two colocated data-parallel ranks (each decoding its own share) train."""
    common = ["train.steps=3", "rl.max_staleness=0", "loss.behaviour=recompute", "train.micro_batch_size=2"]
    colocated = run_local_workers(_run_and_weights, 2, overrides(tmp_path / "colocated", *common), timeout_s=600)
    split = run_local_workers(_counting_decodes, 3, overrides(tmp_path / "split", *common, *SPLIT), timeout_s=600)
    assert split[2]["role"] == "rollout" and split[2]["decodes"] == 3

    def trained(run_dir):  # the sampler's log-probs of a batch of 32 may differ from two of 16 in the last bit
        return [{k: v for k, v in r.items() if not k.startswith("mismatch/")} for r in _records(run_dir)]

    assert trained(tmp_path / "split" / "run") == trained(tmp_path / "colocated" / "run")
    for name, value in colocated[0]["weights"].items():
        assert torch.equal(split[0]["weights"][name], value), name


# -------------------------------------------------------------------------------- partial rollouts

PARTIAL = ["rollout.partial=true", "model.max_seq_length=24", "rollout.max_new_tokens=12"]


def _partial_worker_run(rank, world_size, overrides_, decode_step_s):
    """The RL loop with a rollout worker slowed by ``decode_step_s`` per decode step (so pushes land inside its
    generations). The worker keeps its weights after every push and each decode's output, then recomputes every
    sampled token's log-prob under the weights of the version that sampled it."""
    from vespo_megatron.rl import weight_sync
    from vespo_megatron.rl import worker as worker_module

    weights, decoded = {}, []
    receive, poll = weight_sync.WorkerSync.receive, worker_module.RolloutWorker.poll_pushes
    sample = worker_module.sample_and_score

    def slow_poll(self):
        time.sleep(decode_step_s)
        return poll(self)

    def keep_sample(*args, **kwargs):
        generated, rewards = sample(*args, **kwargs)
        decoded.append(generated)
        return generated, rewards

    worker_module.RolloutWorker.poll_pushes = slow_poll
    worker_module.sample_and_score = keep_sample
    worker_ref = {}
    original_init = worker_module.RolloutWorker.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        worker_ref["worker"] = self

    worker_module.RolloutWorker.__init__ = init

    def keep_weights(self):
        out = receive(self)
        version = int(worker_ref["worker"].last_pushed_version) if "worker" in worker_ref else -1
        weights[version] = {name: param.detach().clone() for name, (_, param) in self.local.items()}
        return out

    weight_sync.WorkerSync.receive = keep_weights
    result = _run_and_weights(rank, world_size, overrides_)
    if result["role"] != "rollout":
        return result
    from tests.hf_fixtures import megatron_logits

    worker = worker_ref["worker"]
    worst, mixed = 0.0, 0
    for generated in decoded:
        versions = generated.token_versions
        mixed += int(sum(len(set(row[row >= 0].tolist())) > 1 for row in versions))
        for version in sorted(set(versions[versions >= 0].tolist())):
            with torch.no_grad():
                for spec, param, _ in weight_sync.canonical_shards(worker.engine.chunks):
                    param.copy_(weights[version][spec.name])
            logits = megatron_logits(worker.engine, generated.sequences[:, :-1])  # the padded vocabulary, as the sampler
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            targets = generated.sequences[:, 1:]
            recomputed = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            here = versions[:, 1:] == version
            worst = max(worst, float((recomputed[here] - generated.sampler_logprobs[:, 1:][here].double()).abs().max()))
    result.update(mixed_sequences=mixed, worst_logprob_error=worst, versions=sorted(weights))
    return result


def test_partial_rollouts_take_pushes_mid_generation_with_exact_per_token_mu(tmp_path):
    """A worker slowed to ~0.6 s per generation takes the trainer's pushes between decode steps: token versions
    change inside sequences, every sampled token's mu equals its log-prob under the weights of its own version,
    and the trainer still trains every step once."""
    extra = ["train.steps=5", "rl.max_staleness=4", "rl.lookahead=1", "optimizer.lr=1e-2",
             "optimizer.weight_decay=0.5", *PARTIAL, *SPLIT]
    trainer, worker = run_local_workers(_partial_worker_run, 2, overrides(tmp_path, *extra), 0.05, timeout_s=600)
    assert worker["mixed_sequences"] > 0, worker
    assert worker["worst_logprob_error"] < 1e-5, worker
    records = deterministic_records(tmp_path / "run")
    assert _trained_indices(tmp_path / "run") == list(range(5))
    assert max(r["partial/mixed_sequences_frac"] for r in records) > 0
    assert max(r["partial/version_span_max"] for r in records) >= 1


def test_partial_rollouts_at_staleness_zero_equal_the_colocated_loop(tmp_path):
    common = ["train.steps=3", "rl.max_staleness=0", "loss.behaviour=sampler", *PARTIAL[1:]]
    colocated = run_local_workers(_run_and_weights, 1, overrides(tmp_path / "colocated", *common), timeout_s=600)[0]
    split = run_local_workers(_run_and_weights, 2, overrides(tmp_path / "split", *common, PARTIAL[0], *SPLIT),
                              timeout_s=600)[0]

    def trained(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("partial/")} for r in _records(run_dir)]

    assert trained(tmp_path / "split" / "run") == trained(tmp_path / "colocated" / "run")
    for name, value in colocated["weights"].items():
        assert torch.equal(split["weights"][name], value), name


def test_partial_rollouts_stop_and_resume_train_every_step_once(tmp_path):
    """SIGUSR1 while the worker, slowed per decode step, has pushes landing inside its generations: it finishes
    the sequences in flight (under the newest weights), the checkpoint holds them, and the resumed run trains
    every step index exactly once."""
    common = ["train.steps=6", "rl.max_staleness=4", "rl.lookahead=2", "checkpoint.save_every=1",
              f"checkpoint.dir={tmp_path / 'ckpt'}", *PARTIAL, *SPLIT]

    def slowed(rank, world_size, overrides_, signal_at_step):
        from vespo_megatron.rl import worker

        poll = worker.RolloutWorker.poll_pushes
        worker.RolloutWorker.poll_pushes = lambda self: (time.sleep(0.03), poll(self))[1]
        return _signalled_trainer(rank, world_size, overrides_, signal_at_step)

    stopped = run_local_workers(slowed, 2, overrides(tmp_path, *common), 3, timeout_s=600)[0]
    assert stopped["step"] == 3
    resumed = run_local_workers(_run_and_weights, 2, overrides(tmp_path, *common), timeout_s=600)[0]
    assert resumed["step"] == 6
    assert _trained_indices(tmp_path / "run") == list(range(6))

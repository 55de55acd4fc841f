"""The launchers in launch/ start a real distributed run: torchrun on two "nodes", and SLURM batch jobs.

The SLURM tests bring up a one-node cluster on this machine with launch/local_slurm.sh (installing the
Debian packages when they are missing), submit launch/slurm.sbatch, and check a signalled job checkpoints,
requeues and resumes. The launchers run the real trainer (``vespo_megatron.cli train``) on a tiny CPU
config: two gloo processes with tensor parallelism 2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
# Launcher options that pick the program torchrun runs; empty = the real `vespo_megatron.cli train`.
TRAINER_ARGS: list[str] = []

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp: Path, steps: int, save_every: int = 0) -> tuple[Path, Path, Path]:
    """A tiny two-process RL config; returns (config, run_dir, checkpoint_dir)."""
    run_dir, ckpt_dir = tmp / "run", tmp / "ckpt"
    config = yaml.safe_load((REPO / "configs" / "tiny_dense_cpu.yaml").read_text())
    config["model"]["max_seq_length"] = 16
    config["train"].update(steps=steps, micro_batch_size=4)
    config["rollout"] = {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4}
    config["rl"] = {"num_minibatches": 1}
    config["task"] = {"name": "arithmetic", "options": {"max_operand": 5, "seed": 3}}
    config["checkpoint"] = {"dir": str(ckpt_dir), "save_every": save_every}
    config["logging"] = {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": False}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir, ckpt_dir


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_step(ckpt_dir: Path) -> int:
    path = ckpt_dir / "latest"
    return int(path.read_text()) if path.exists() else 0


def test_torchrun_two_nodes_on_localhost(tmp_path):
    config, run_dir, ckpt_dir = write_config(tmp_path, steps=3)
    port = free_port()
    procs = [
        subprocess.Popen(
            [str(LAUNCH / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(node_rank),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             *TRAINER_ARGS, str(config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node_rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for node_rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node_rank} exited {proc.returncode}:\n{out}"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(0.0 <= m["reward/mean"] <= 1.0 for m in metrics)
    assert checkpoint_step(ckpt_dir) == 3


# ----------------------------------------------------------------------------------------------- SLURM


def _run(cmd: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """A running one-node SLURM cluster; yields the environment for its client commands."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is absent, so launch/local_slurm.sh cannot install SLURM on this machine")
    harness = [str(LAUNCH / "local_slurm.sh"), "--dir", str(tmp_path_factory.mktemp("slurm")),
               "--ctld-port", str(free_port()), "--slurmd-port", str(free_port())]
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        done = subprocess.run([*harness, "install"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"local_slurm.sh install failed:\n{done.stdout}\n{done.stderr}"
    started = subprocess.run([*harness, "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run([*harness, "stop"], capture_output=True, text=True)
        pytest.fail(f"local SLURM did not start:\n{started.stdout}\n{started.stderr}")
    env = dict(os.environ)
    for line in started.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            env["SLURM_CONF"] = line.split("=", 1)[1]
    assert "SLURM_CONF" in env, started.stdout
    yield env
    stopped = subprocess.run([*harness, "stop"], capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr


def node_states(env: dict) -> set[str]:
    """SLURM's compact node states (``idle``, ``comp`` while a finished job is still being cleaned up, ...)."""
    return set(_run(["sinfo", "-h", "-o", "%t"], env).stdout.split())


def job_fields(job_id: str, env: dict) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", job_id], env).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def sbatch_cmd(tmp: Path, config: Path, *sbatch_opts: str) -> list[str]:
    return [
        "sbatch", "--nodes=1", "--cpus-per-task=2", f"--chdir={REPO}", f"--output={tmp}/sbatch-%j.out",
        *sbatch_opts, str(LAUNCH / "slurm.sbatch"),
        "--nproc-per-node", "2", "--log-root", str(tmp / "logs"), *TRAINER_ARGS, str(config),
    ]


def job_log(tmp: Path) -> str:
    return "\n".join(f"----- {p}\n{p.read_text()}" for p in sorted(tmp.rglob("*.out")))


def daemon_logs(env: dict, lines: int = 60) -> str:
    """The last ``lines`` of the local cluster's slurmctld and slurmd logs (why a job failed to launch)."""
    logs = Path(env["SLURM_CONF"]).parent / "log"
    return "\n".join(f"----- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in sorted(logs.glob("*.log")))


def test_slurm_batch_run(slurm_env, tmp_path):
    config, run_dir, ckpt_dir = write_config(tmp_path, steps=3)
    done = _run([*sbatch_cmd(tmp_path, config, "--wait", "--job-name=vespo-test")], slurm_env, timeout=900)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{job_log(tmp_path)}"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3], job_log(tmp_path)
    assert checkpoint_step(ckpt_dir) == 3
    job_id = done.stdout.split()[-1]
    assert (tmp_path / "logs" / f"vespo-test-{job_id}" / "node-0.out").exists()


def wait_for(predicate, timeout_s: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{log()}")


def test_slurm_signal_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    steps = 40
    config, run_dir, ckpt_dir = write_config(tmp_path, steps=steps, save_every=2)
    submitted = _run([*sbatch_cmd(tmp_path, config, "--parsable", "--job-name=vespo-requeue")], slurm_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = lambda: job_log(tmp_path) + "\n" + daemon_logs(slurm_env)  # noqa: E731

    wait_for(lambda: checkpoint_step(ckpt_dir) >= 2, 600, "a first checkpoint", log)
    # What SLURM does at `--signal=B:USR1@T` before the time limit: signal the batch shell only.
    signal_time = time.time()
    signalled = _run(["scancel", "--signal=USR1", "--batch", job_id], slurm_env)
    assert signalled.returncode == 0, signalled.stderr

    wait_for(lambda: job_fields(job_id, slurm_env).get("Restarts") == "1", 600, "the requeue", log)
    saved_step = checkpoint_step(ckpt_dir)
    assert 2 <= saved_step < steps, f"the signal arrived after training had finished\n{log()}"
    # SLURM holds a requeued job for about two minutes (its BeginTime), time in which the node finishes
    # cleaning up the first run (the workers still writing their checkpoint after torchrun exits). Release
    # the job as soon as the node is idle again, not before: a job started on a completing node fails to launch.
    wait_for(lambda: node_states(slurm_env) == {"idle"}, 300, "the node to finish the first run", log)
    # The node reads idle before slurmd has let go of the first run's batch step; a job released then is refused
    # ("Job N already killed, do not launch batch job" in slurmd.log: FAILED, RunTime 0, ExitCode 1:0). Release it
    # only once slurmd has logged the batch step done, and a margin after that.
    slurmd_log = Path(slurm_env["SLURM_CONF"]).parent / "log" / "slurmd.log"
    wait_for(lambda: f"[{job_id}.batch] done with job" in slurmd_log.read_text(errors="replace"), 300,
             "slurmd to finish the first run's batch step", log)
    time.sleep(10)
    _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], slurm_env)
    final = wait_for(
        lambda: (s := job_fields(job_id, slurm_env).get("JobState")) in {"COMPLETED", "FAILED", "CANCELLED"} and s,
        900, "the requeued job to finish", log,
    )
    assert final == "COMPLETED", f"{job_fields(job_id, slurm_env)}\n{log()}"

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), log()
    # The first steps were written before the signal and kept; the steps after the checkpoint were written
    # by the requeued run, which resumed from the checkpoint instead of starting again at step 1.
    assert all(m["time"] < signal_time for m in metrics[:2])
    assert all(m["time"] > signal_time for m in metrics[saved_step:])
    assert f"resumed from {ckpt_dir}/step_{saved_step:08d} at step {saved_step}" in log()
    assert checkpoint_step(ckpt_dir) == steps
    assert "requeueing job" in log()

"""``vespo-megatron selftest``: check a fresh node end to end with one command; one JSON object out.

Every phase runs the real RL loop in a fresh process of one rank (nccl on CUDA, gloo on CPU):

* ``dense``: VESPO RL steps on a dense model with the distributed optimizer, sampled by the KV-cache decoder.
  CPU: ``configs/tiny_dense_cpu.yaml`` at TP1 in fp32. CUDA: the same architecture grown to about 1B parameters
  (24 layers, hidden 2048, 2048-token context) in bf16, on the Transformer Engine spec when TE imports, else the
  local spec. Reports seconds per step, response tokens/s, the update's model FLOPs utilisation (CUDA, against
  the GPU's dense bf16 peak when the GPU is known), the train/sampler mismatch (``mismatch/seq_abs_log_ratio_max``:
  the decoder's per-token log-probs against the training forward's), peak memory and ``check-config``'s estimate.
* ``moe``: the same on ``configs/tiny_moe_cpu.yaml`` (CPU) or that model grown to 8 experts of hidden 1024 (CUDA).
* ``resume``: the dense run saved after step 1 and resumed to step 3 in a new process logs exactly what an
  uninterrupted 3-step run logs (wall-clock fields aside), and ends on the same weights.

Nothing needs the network, the hub, Transformer Engine or apex. docs/benchmarks.md has the figures of the runs
made so far (none on GPU yet).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vespo_megatron.demo import default_config_path
from vespo_megatron.metrics import read_metrics

GPU_PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
"""Dense bf16 tensor-core peak of the GPUs we know (TFLOP/s), by a substring of the device name."""

CUDA_DENSE = ["model.num_layers=24", "model.hidden_size=2048", "model.ffn_hidden_size=5632",
              "model.num_attention_heads=16", "model.num_query_groups=8", "model.max_seq_length=2048",
              "model.dtype=bf16", "rollout.max_new_tokens=256", "rollout.prompts_per_step=16",
              "rollout.group_size=8", "train.micro_batch_size=8", "train.global_batch_size=128"]
CUDA_MOE = ["model.num_layers=8", "model.hidden_size=1024", "model.num_attention_heads=16",
            "model.num_query_groups=4", "model.num_experts=8", "model.moe_ffn_hidden_size=1024",
            "model.max_seq_length=1024", "model.dtype=bf16", "rollout.max_new_tokens=128"]
COMMON = ["parallel.tp=1", "optimizer.use_distributed_optimizer=true", "rl.eval_prompts=0",
          "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.dir=null"]
WALL_CLOCK = ("time", "time/", "throughput/")


def _status_mib(field: str) -> float:
    """A ``VmRSS``-style field of /proc/self/status, in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def _weights_digest(engine) -> str:
    from vespo_megatron.models.gpt import unwrap

    digest = hashlib.sha256()
    for chunk in engine.chunks:
        for name, value in sorted(unwrap(chunk).state_dict().items()):
            if torch.is_tensor(value):
                digest.update(name.encode())
                digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _phase(rank, world_size, config_path, overrides, device):
    """One RL run in this fresh process; what the report needs from inside it."""
    from vespo_megatron.rl.loop import run
    from vespo_megatron.run_config import load_run_config

    if device == "cpu":
        with open("/proc/self/clear_refs", "w") as refs:  # the peak resident size counts from here
            refs.write("5")
        baseline = _status_mib("VmRSS")
    trainer = run(load_run_config(config_path, overrides))
    engine = trainer.context.engine
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _status_mib("VmHWM") - baseline
    return {"weights": _weights_digest(engine), "peak_memory_mib": peak,
            "transformer_impl": trainer.context.config.model.transformer_impl}


def _in_fresh_process(device: str, config_path: str, overrides: list[str], timeout_s: float) -> dict:
    from vespo_megatron.runtime.local_workers import run_local_workers

    backend = "nccl" if device == "cuda" else "gloo"
    return run_local_workers(_phase, 1, config_path, overrides, device, timeout_s=timeout_s, backend=backend)[0]


def model_flops_utilisation(active_params: int, tokens: float, seconds: float, device_name: str) -> float | None:
    """``6 N tokens / seconds`` over the GPU's dense bf16 peak (None for an unknown device or no time)."""
    peak = next((tflops for name, tflops in GPU_PEAK_BF16_TFLOPS.items() if name in device_name), None)
    if peak is None or seconds <= 0:
        return None
    return 6.0 * active_params * tokens / seconds / (peak * 1e12)


def _estimate(config_path: str, overrides: list[str]) -> tuple[float, int]:
    """``check-config``'s peak per rank (MiB, without the flat CUDA allowance) and active parameters."""
    from vespo_megatron import estimates
    from vespo_megatron.check_config import config_vocab_size
    from vespo_megatron.run_config import load_run_config

    config = load_run_config(config_path, overrides)
    vocab = config_vocab_size(config)
    peak = estimates.peak_memory(estimates.estimate_memory(config, 1, vocab, overhead_gb=0.0))
    return peak.total / 2**20, estimates.active_parameters(config, vocab)


def rl_phase(name: str, device: str, config_path: str, overrides: list[str], steps: int, timeout_s: float) -> dict:
    """Run ``steps`` RL steps and report time, throughput, MFU, mismatch and memory against the estimate."""
    with tempfile.TemporaryDirectory(prefix=f"vespo-selftest-{name}-") as tmp:
        run_overrides = overrides + [f"train.steps={steps}", f"logging.run_dir={tmp}"]
        started = time.perf_counter()
        inside = _in_fresh_process(device, config_path, run_overrides, timeout_s)
        seconds = time.perf_counter() - started
        records = read_metrics(tmp)
    timed = records[1:] or records  # the first step pays for start-up work
    estimate_mib, active = _estimate(config_path, run_overrides)
    train_s = statistics.mean(r["time/train"] + r["time/optimizer"] for r in timed)
    trained_tokens = statistics.mean(r["response/tokens"] for r in timed)  # response labels of the update
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    mismatch = max((r["mismatch/seq_abs_log_ratio_max"] for r in records if "mismatch/seq_abs_log_ratio_max" in r),
                   default=float("nan"))
    return {
        "steps": len(records),
        "seconds": round(seconds, 1),
        "step_s": statistics.median(r["time/step"] for r in timed),
        "tokens_per_s": sum(r["response/tokens"] for r in timed) / sum(r["time/step"] for r in timed),
        "mfu": model_flops_utilisation(active, trained_tokens, train_s, device_name),
        "mismatch_seq_abs_log_ratio_max": mismatch,
        "loss_finite": all(math.isfinite(r["loss/value"]) for r in records),
        "peak_memory_mib": round(inside["peak_memory_mib"], 1),
        "estimate_mib": round(estimate_mib, 1),
        "transformer_impl": inside["transformer_impl"],
        "active_parameters": active,
    }


def resume_phase(device: str, config_path: str, overrides: list[str], timeout_s: float) -> dict:
    """Uninterrupted 3 steps against 1 step saved, then resumed to 3 in a new process: same records, weights."""
    with tempfile.TemporaryDirectory(prefix="vespo-selftest-resume-") as tmp:
        straight = overrides + ["train.steps=3", f"logging.run_dir={tmp}/straight"]
        saved = overrides + [f"checkpoint.dir={tmp}/ckpt", "checkpoint.save_every=1", f"logging.run_dir={tmp}/resumed"]
        whole = _in_fresh_process(device, config_path, straight, timeout_s)
        _in_fresh_process(device, config_path, saved + ["train.steps=1"], timeout_s)
        resumed = _in_fresh_process(device, config_path, saved + ["train.steps=3"], timeout_s)

        def deterministic(run: str) -> list[dict]:
            records = read_metrics(Path(tmp) / run)
            return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in records]

        same_records = deterministic("straight") == deterministic("resumed")
    return {"records_equal": same_records, "weights_equal": whole["weights"] == resumed["weights"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vespo-megatron selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda when a GPU is visible (auto, the default), else cpu")
    parser.add_argument("--steps", type=int, default=4, help="RL steps of the dense and MoE phases (default 4)")
    parser.add_argument("--phases", default="dense,moe,resume",
                        help="comma-separated phases to run (default dense,moe,resume)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a phase may take (default 900)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device; use --device cpu or check the driver")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - {"dense", "moe", "resume"})
    if unknown or not phases:
        raise ValueError(f"--phases {args.phases!r}: choose from dense, moe, resume")
    if args.steps < 2:
        raise ValueError(f"--steps {args.steps} must be >= 2 (the first step is not timed)")
    configs = default_config_path().parent
    dense = [*COMMON, *(CUDA_DENSE if device == "cuda" else [])]
    moe = [*COMMON, "parallel.ep=1", *(CUDA_MOE if device == "cuda" else [])]  # one rank holds every expert
    report: dict = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__}
    started = time.perf_counter()
    for phase in phases:
        if not args.json:
            print(f"selftest: {phase} ...", flush=True)
        if phase == "dense":
            report["dense"] = rl_phase("dense", device, str(configs / "tiny_dense_cpu.yaml"), dense, args.steps,
                                       args.timeout)
        elif phase == "moe":
            report["moe"] = rl_phase("moe", device, str(configs / "tiny_moe_cpu.yaml"), moe, args.steps, args.timeout)
        else:
            report["resume"] = resume_phase(device, str(configs / "tiny_dense_cpu.yaml"), dense, args.timeout)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(report[p].get("loss_finite", True) and report[p].get("records_equal", True)
                       and report[p].get("weights_equal", True) for p in phases)
    print(json.dumps(report))
    return 0 if report["ok"] else 1

"""Shared driver for the CPU-compat shim tests (tests/unit/test_compat_*.py).

Shims rebind module globals, so the pytest process must never apply them. Each test file runs itself
as a script in one fresh interpreter, which imports Megatron once and forks one gloo worker per case
through ``run_local_workers``; a case runs the unpatched upstream call first, records how it fails,
applies its shim and records the result of the same call. The pytest side only reads the outcomes.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]

# How a CUDA-only call fails without a GPU. CPU build: the first two. CUDA build: no driver in a
# fresh process; any lazy-init call in a forked worker whose parent already probed the driver; stream
# and event constructors, which go straight to the CUDA runtime (a driver stub answers "insufficient");
# a driver but no visible device.
CUDA_MISSING = (
    "Torch not compiled with CUDA enabled",
    "Tried to instantiate dummy base class",
    "Found no NVIDIA driver",
    "Cannot re-initialize CUDA in forked subprocess",
    "CUDA driver version is insufficient for CUDA runtime version",
    "No CUDA GPUs are available",
)


def cuda_missing(message: str) -> bool:
    """True when ``message`` (from :func:`error`) is one of torch's "no CUDA here" failures."""
    return any(text in message for text in CUDA_MISSING)


def error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting it to raise; return ``"ExceptionType: message"`` (or ``"no error"``)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the message is what the tests check
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def init_parallel(tp: int = 1, ep: int = 1) -> None:
    """``parallel_state`` for a worker (sizes must divide the worker world)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)


# Imported once by the driver so that every forked case starts warm.
_WARM_IMPORTS = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.distributed",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel",
    "megatron.core.transformer.moe.moe_layer",
)


def drive(cases: dict[str, tuple[Callable, int]], out_path: str) -> None:
    """Run every ``name: (fn, world_size)`` case in its own forked worker; pickle the outcomes."""
    import importlib

    for name in _WARM_IMPORTS:
        importlib.import_module(name)
    from vespo_megatron.runtime import compat
    from vespo_megatron.runtime.local_workers import WorkerError, run_local_workers

    assert not compat.applied_shims(), "the driver process must stay unpatched"
    outcomes = {}
    for name, (fn, world_size) in cases.items():
        try:
            outcomes[name] = (True, run_local_workers(fn, world_size, timeout_s=120))
        except WorkerError as exc:
            outcomes[name] = (False, str(exc))
        except Exception:  # noqa: BLE001
            outcomes[name] = (False, traceback.format_exc())
    Path(out_path).write_bytes(pickle.dumps(outcomes))


def run_driver(test_file: str) -> dict:
    """Run ``test_file`` as a script (its ``__main__`` calls :func:`drive`) and load the outcomes."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outcomes.pkl"
        proc = subprocess.run(
            [sys.executable, test_file, str(out)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0 and out.exists(), f"driver failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        return pickle.loads(out.read_bytes())


def result(outcomes: dict, name: str, rank: int = 0):
    """What rank ``rank`` of case ``name`` returned (fails the test with the worker traceback)."""
    ok, value = outcomes[name]
    assert ok, value
    return value[rank]

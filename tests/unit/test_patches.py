"""The source patches in patches/ apply to the installed megatron-core, together, and are documented.

Each patch must dry-run cleanly (no fuzz, no offsets that hide a rejected hunk) on its own against the
installed megatron-core, and the whole set must apply in file-name order onto a copy. A copy of the
package with every patch applied must then run a tiny MoE GPT step on CPU without the runtime shims.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO_ROOT / "patches"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))


def _site_root() -> Path:
    """The directory that holds the installed ``megatron/`` package (``patch -p1`` runs there)."""
    import megatron.core

    return Path(megatron.core.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def patch_tool() -> str:
    tool = shutil.which("patch") or ("/usr/bin/patch" if Path("/usr/bin/patch").exists() else None)
    if tool is None:
        pytest.skip("GNU patch is not installed (apt-get install patch); cannot check patches/")
    return tool


def _touched_files(patch: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)]


def _apply(tool: str, root: Path, patch: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, "-p1", "--forward", "--batch", "--no-backup-if-mismatch", *extra, "-d", str(root), "-i", str(patch)],
        capture_output=True,
        text=True,
    )


def test_one_patch_per_runtime_shim():
    from vespo_megatron.runtime.compat import SHIMS

    patch_ids = {f"P{int(re.match(r'p(\d\d)-', p.name).group(1))}" for p in PATCHES}
    assert patch_ids == {shim.shim_id for shim in SHIMS}, [p.name for p in PATCHES]
    for patch in PATCHES:
        files = _touched_files(patch)
        assert files and all(f.startswith("megatron/core/") for f in files), (patch.name, files)


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_dry_runs_on_installed_megatron(patch_tool, patch):
    proc = _apply(patch_tool, _site_root(), patch, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fuzz" not in proc.stdout and "FAILED" not in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory, patch_tool) -> Path:
    """A copy of the installed ``megatron`` package with every patch applied in file-name order."""
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(
        _site_root() / "megatron", root / "megatron", ignore=shutil.ignore_patterns("__pycache__")
    )
    for patch in PATCHES:
        proc = _apply(patch_tool, root, patch)
        assert proc.returncode == 0, f"{patch.name} after the earlier patches:\n{proc.stdout}{proc.stderr}"
        assert "fuzz" not in proc.stdout, proc.stdout
    assert not list(root.rglob("*.rej"))
    return root


def test_patches_apply_in_sequence(patched_copy):
    for patch in PATCHES:
        for name in _touched_files(patch):
            assert (patched_copy / name).read_text() != (_site_root() / name).read_text(), name


_SMOKE = textwrap.dedent(
    """
    import math, os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    import megatron.core
    assert megatron.core.__file__.startswith(sys.argv[1]), megatron.core.__file__
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=4,
        moe_router_topk=2, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
    )
    gpt = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4),
        vocab_size=32, max_sequence_length=8,
    )
    # Megatron's DDP (grad buffers, bucketed grad sync) and FP32 optimizer (clip + step), as in training.
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt)
    sgd = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
    opt_config = OptimizerConfig(optimizer="sgd", lr=0.1, clip_grad=1e-3)
    optimizer = FP32Optimizer(sgd, opt_config, None)
    tokens = torch.randint(0, 32, (2, 8))
    positions = torch.arange(8).expand(2, 8)

    def forward_step(data_iterator, module):
        out = module(tokens, positions, None, labels=tokens)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=model,
        num_microbatches=1, seq_length=8, micro_batch_size=2,
    )
    model.finish_grad_sync()
    before = [p.detach().clone() for p in model.parameters()]
    ok, grad_norm, _ = optimizer.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert ok and math.isfinite(grad_norm) and grad_norm > 0, (ok, grad_norm)
    assert math.isfinite(float(losses[0]["loss"])) and moved > 0, moved
    print("OK")
    """
)


@pytest.mark.slow
def test_patched_copy_runs_moe_gpt_step_without_shims(patched_copy):
    from vespo_megatron.runtime.local_workers import free_port

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(patched_copy), os.environ.get("PYTHONPATH", "")]),
        TORCHDYNAMO_DISABLE="1",
        PYTHONWARNINGS="ignore",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SMOKE, str(patched_copy)],
        cwd=patched_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_readme_lists_every_patch():
    readme = (PATCH_DIR / "README.md").read_text()
    listed = set(re.findall(r"`(p\d\d-[\w-]+\.patch)`", readme))
    assert listed == {p.name for p in PATCHES}
    assert "0.19.2" in readme and "patch -p1 --dry-run" in readme

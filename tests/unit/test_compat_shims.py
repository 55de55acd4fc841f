"""Each CPU compatibility shim removes one real Megatron-Core failure, and only applies where it should.

Every case below runs the unpatched upstream call first and records how it fails, then applies that
one shim (plus the shims it needs, e.g. P1 before P5) and records the result of the same call. Shims
rebind module globals, so the pytest process must never apply them: all cases run in one fresh
interpreter (this file run as a script), which imports Megatron once and forks one gloo worker per
case through ``run_local_workers``; the parent only compares what the workers report.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CUDA_MISSING = "Torch not compiled with CUDA enabled"


def _error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting it to raise; return ``"ExceptionType: message"`` (or ``"no error"``)."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _init_parallel(tp: int = 1, ep: int = 1) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep
    )


# ---------------------------------------------------------------------------------------- cases
# Each case is ``fn(rank, world_size) -> dict`` and runs in its own forked worker.


def case_p1(rank, world_size):
    import torch
    from megatron.core import parallel_state

    from vespo_megatron.runtime import compat

    _init_parallel()
    buffer = parallel_state.get_global_memory_buffer()
    before = _error(buffer.get_tensor, (2, 3), torch.float32, "p1")
    compat.shim_current_device()
    out = buffer.get_tensor((2, 3), torch.float32, "p1")
    return {"before": before, "shape": tuple(out.shape), "device": str(out.device)}


def case_p2(rank, world_size):
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from vespo_megatron.runtime import compat

    _init_parallel()
    before = _error(tensor_parallel.model_parallel_cuda_manual_seed, 1)
    compat.shim_cuda_rng_states_tracker()

    def draw(name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        torch.manual_seed(123)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        with tensor_parallel.get_cuda_rng_tracker().fork(name):
            forked = torch.randn(4)
        return forked, torch.randn(4)  # the default generator continues as if no fork happened

    forked_a, after_a = draw()
    forked_b, after_b = draw()
    forked_dp, _ = draw(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME)
    torch.manual_seed(123)
    no_fork = torch.randn(4)

    # Activation recompute re-runs forward under the saved tracker state: dropout masks must match.
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    x = torch.ones(64, requires_grad=True)

    def dropped(inp):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(inp, p=0.5, training=True)

    initialized = tensor_parallel.get_cuda_rng_tracker().is_initialized()
    out = tensor_parallel.checkpoint(dropped, False, x)
    out.sum().backward()  # d(sum(mask * 2 * x))/dx = mask * 2 = out, if recompute redraws the mask
    return {
        "before": before,
        "reproducible": torch.equal(forked_a, forked_b),
        "streams_differ": not torch.equal(forked_a, forked_dp),
        "default_untouched": torch.equal(after_a, no_fork) and torch.equal(after_b, no_fork),
        "recompute_mask_matches": torch.equal(x.grad, out.detach()) and 0 < int((out == 0).sum()) < 64,
        "tracker_initialized": initialized,
    }


def case_p3(rank, world_size):
    import torch
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.runtime import compat

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False,
        mask_func=tutils.attention_mask_func,
        softmax_in_fp32=True,
        scale=None,
    )
    scores = torch.randn(1, 2, 4, 4)
    before = _error(tutils.get_default_causal_mask, 4)
    before_softmax = _error(softmax, scores, None)
    before_window = _error(tutils.get_sliding_window_causal_mask, 3, 5, (1, 0))
    compat.shim_get_default_causal_mask()
    probs = softmax(scores, None)
    window = tutils.get_sliding_window_causal_mask(3, 5, (1, 0))
    # The upstream formula, evaluated on CPU.
    ones = torch.ones(3, 5, dtype=torch.bool)
    window_ref = ~torch.tril(torch.triu(ones, diagonal=5 - 3 - 1), diagonal=5 - 3 + 0)
    return {
        "before": before,
        "before_softmax": before_softmax,
        "before_window": before_window,
        "mask_ok": torch.equal(tutils.get_default_causal_mask(4), torch.triu(torch.ones(4, 4), 1).bool()),
        "probs_causal": bool((probs.triu(1) == 0).all()) and torch.allclose(probs.sum(-1), torch.ones(1, 2, 4)),
        "window_ok": torch.equal(window, window_ref),
    }


def _moe_config(**overrides):
    import torch
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        ffn_hidden_size=16,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _build_moe_layer(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return MoELayer(config=config, submodules=spec.submodules.mlp.submodules)


def case_p5(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    _init_parallel()
    compat.shim_current_device()
    compat.shim_cuda_rng_states_tracker()
    before_stream = _error(torch.cuda.Stream)
    before_layer = _error(_build_moe_layer, _moe_config())
    compat.shim_cuda_streams()
    layer = _build_moe_layer(_moe_config())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        value = torch.ones(2).sum().item()
    torch.cuda.current_stream().record_event().synchronize()
    torch.cuda.synchronize()
    return {"before_stream": before_stream, "before_layer": before_layer, "layer": type(layer).__name__, "value": value}


def case_p6(rank, world_size):
    import torch
    from megatron.core.transformer.moe import moe_utils

    from vespo_megatron.runtime import compat

    gen = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 3, 8, generator=gen)
    weight = torch.randn(4, 8, generator=gen)

    def run():
        x = inp.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
        (logits * torch.arange(4.0)).sum().backward()
        return logits.detach(), x.grad, w.grad

    before = _error(run)
    compat.shim_te_general_gemm()
    logits, x_grad, w_grad = run()
    x = inp.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref = x @ w.t()
    (ref * torch.arange(4.0)).sum().backward()
    return {
        "before": before,
        "logits_ok": torch.allclose(logits, ref.detach()),
        "grads_ok": torch.allclose(x_grad, x.grad) and torch.allclose(w_grad, w.grad),
    }


def case_p7(rank, world_size):
    import torch
    from megatron.core.transformer.moe import token_dispatcher

    from vespo_megatron.runtime import compat

    tokens = torch.arange(6.0).view(3, 2)

    def exchange():
        # What the alltoall dispatcher does with its split sizes (mappings.all_to_all short-circuits
        # a group of one, so call the collective it reaches at EP>1 directly).
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
        out = torch.empty_like(tokens)
        torch.distributed.all_to_all_single(out, tokens, output_split_sizes=splits, input_split_sizes=splits)
        return type(splits).__name__, out

    before_type = type(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)).__name__
    before_a2a = _error(exchange)
    compat.shim_maybe_move_tensor_to_cpu()
    after_type, out = exchange()
    return {
        "before_type": before_type,
        "before_a2a": before_a2a,
        "after_type": after_type,
        "a2a_ok": torch.equal(out, tokens),
    }


def case_p8(rank, world_size):
    import torch
    from megatron.core.tensor_parallel import mappings

    from vespo_megatron.runtime import compat

    group = torch.distributed.group.WORLD
    sizes = [1, 3]
    local = torch.full((sizes[rank], 2), float(rank + 1))
    full = torch.arange(8.0).view(4, 2) * (rank + 1)  # reduce-scatter input: sum over ranks = 3x
    compat.shim_current_device()  # the gather allocates its output on the current device first
    before_gather = _error(mappings._gather_along_first_dim, local, group, output_split_sizes=sizes)
    start = sum(sizes[:rank])
    expected_rs = (torch.arange(8.0).view(4, 2) * 3)[start : start + sizes[rank]]
    try:
        upstream_rs = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
        before_rs = "correct" if torch.equal(upstream_rs, expected_rs) else f"wrong: {upstream_rs.tolist()}"
    except Exception as exc:  # noqa: BLE001
        before_rs = f"{type(exc).__name__}: {exc}"
    compat.shim_uneven_split_mappings()
    gathered = mappings._gather_along_first_dim(local, group, output_split_sizes=sizes)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    return {
        "before_gather": before_gather,
        "before_rs": before_rs,
        "gather_ok": torch.equal(gathered, torch.tensor([[1.0, 1.0]] + [[2.0, 2.0]] * 3)),
        "rs_ok": torch.equal(scattered, expected_rs),
    }


def case_p9(rank, world_size):
    import torch
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    from vespo_megatron.runtime import compat

    before_module = gg.grouped_gemm
    before = _error(gg.assert_grouped_gemm_is_available)
    compat.shim_grouped_gemm()
    gen = torch.Generator().manual_seed(0)
    batch_sizes = torch.tensor([2, 0, 3])
    results = {}
    for trans_b in (False, True):
        a = torch.randn(5, 4, generator=gen, requires_grad=True)
        b = torch.randn(3, 6, 4, generator=gen) if trans_b else torch.randn(3, 4, 6, generator=gen)
        b.requires_grad_()
        out = gg.ops.gmm(a, b, batch_sizes, trans_b=trans_b)
        weight = torch.randn(out.shape, generator=gen)
        (out * weight).sum().backward()
        a_ref = a.detach().clone().requires_grad_()
        b_ref = b.detach().clone().requires_grad_()
        rows, start = [], 0
        for expert, count in enumerate(batch_sizes.tolist()):
            mat = b_ref[expert].t() if trans_b else b_ref[expert]
            rows.append(a_ref[start : start + count] @ mat)
            start += count
        ref = torch.cat(rows)
        (ref * weight).sum().backward()
        results[trans_b] = (
            torch.allclose(out, ref)
            and torch.allclose(a.grad, a_ref.grad)
            and torch.allclose(b.grad, b_ref.grad)
            and torch.equal(b.grad[1], torch.zeros_like(b.grad[1]))  # the empty expert gets no grad
        )
    return {
        "before_none": before_module is None,
        "before": before,
        "available": gg.grouped_gemm_is_available(),
        "gmm_ok": results[False],
        "gmm_trans_b_ok": results[True],
    }


def _schedule_step():
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    class Chunk(torch.nn.Linear):
        config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
        model_type = ModelType.encoder_or_decoder

        def set_input_tensor(self, tensor):
            pass

    model = Chunk(3, 1)
    batch = iter([torch.ones(2, 3)])

    def forward_step(data_iterator, module):
        out = module(next(data_iterator))

        def loss_func(output):
            loss = output.sum()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batch,
        model=model,
        num_microbatches=1,
        seq_length=1,
        micro_batch_size=2,
    )
    return losses, model.weight.grad


def case_p10(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    _init_parallel()
    before_zeros = _error(torch.zeros, 2, device="cuda")
    before_schedule = _error(_schedule_step)
    compat.shim_cuda_device_factories()
    x = torch.ones(2)
    made = [
        torch.zeros(2, device="cuda"),
        torch.tensor([1.0], device="cuda:0"),
        torch.full((2,), 3.0, device=torch.device("cuda")),
        torch.empty_like(x, device="cuda"),
        x.cuda(),
        x.to("cuda"),
        x.to(device="cuda", dtype=torch.float64),
    ]
    _, grad = _schedule_step()
    return {
        "before_zeros": before_zeros,
        "before_schedule": before_schedule,
        "devices": sorted({str(t.device) for t in made}),
        "to_dtype": made[-1].dtype == torch.float64,
        "grad_ok": torch.equal(grad, torch.full((1, 3), 2.0)),
    }


def case_p11(rank, world_size):
    import torch
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from vespo_megatron.runtime import compat

    compat.shim_cuda_device_factories()  # the clip path also allocates on "cuda"
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    before_type = torch.zeros(1).type()
    before_clip = _error(clip_grad_by_total_norm_fp32, [param], 1.0, 4.0)
    compat.shim_tensor_type()
    clip_grad_by_total_norm_fp32([param], 1.0, 4.0)
    return {
        "before_type": before_type,
        "before_clip": before_clip,
        "types": [
            torch.zeros(1).type(),
            torch.zeros(1, dtype=torch.float16).type(),
            torch.zeros(1, dtype=torch.bfloat16).type(),
            torch.zeros(1, dtype=torch.long).type(),
        ],
        "cast": torch.zeros(1).type(torch.float64).dtype == torch.float64,
        "clipped": torch.allclose(param.grad, torch.full((4,), 2.0 / (4.0 + 1e-6))),
    }


class _ManagerProbe:
    """Stands in for ``multiprocessing`` in filesystem_async: records Manager spawns without spawning."""

    def __init__(self):
        self.managers = 0

    def get_context(self, method):
        probe = self

        class Context:
            def Manager(self):  # noqa: N802 - mirrors multiprocessing's name
                probe.managers += 1
                import queue

                return type("FakeManager", (), {"Queue": staticmethod(queue.Queue)})()

        return Context()


def case_p12(rank, world_size):
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from vespo_megatron.runtime import compat

    probe = _ManagerProbe()
    filesystem_async.mp = probe
    filesystem_async._results_queue = None
    filesystem_async._get_write_results_queue()
    before = probe.managers
    filesystem_async._results_queue = None
    compat.shim_write_results_queue()
    first = filesystem_async._get_write_results_queue()
    second = filesystem_async._get_write_results_queue()
    return {
        "before_managers": before,
        "after_managers": probe.managers - before,
        "in_process": isinstance(first, queue.Queue) and first is second,
    }


def _patched_targets():
    """The objects every shim rebinds, by a readable name (identity tells whether a shim re-ran)."""
    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils, token_dispatcher

    return {
        "current_device": torch.cuda.current_device,
        "tracker_class": mrandom.CudaRNGStatesTracker,
        "tracker": mrandom._CUDA_RNG_STATE_TRACKER,
        "causal_mask": tutils.get_default_causal_mask,
        "stream": torch.cuda.Stream,
        "synchronize": torch.cuda.synchronize,
        "te_general_gemm": getattr(moe_utils, "te_general_gemm", "unbound"),
        "move_to_cpu": token_dispatcher.maybe_move_tensor_to_cpu,
        "gather": mappings._gather_along_first_dim,
        "grouped_gemm": grouped_gemm_util.grouped_gemm,
        "zeros": torch.zeros,
        "arange": torch.arange,
        "tensor_cuda": torch.Tensor.cuda,
        "tensor_to": torch.Tensor.to,
        "tensor_type": torch.Tensor.type,
        "results_queue": filesystem_async._get_write_results_queue,
    }


def case_idempotent(rank, world_size):
    from megatron.core import tensor_parallel

    from vespo_megatron.runtime import compat

    _init_parallel()
    pristine = _patched_targets()
    first_ids = compat.apply_cpu_compat()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    states = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    once = _patched_targets()
    second_ids = compat.apply_cpu_compat()
    for shim in compat.SHIMS:
        shim.apply()
    twice = _patched_targets()
    states_after = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "ids": [first_ids, second_ids, compat.applied_shims()],
        "all_ids": sorted(shim.shim_id for shim in compat.SHIMS),
        "changed_by_first": sorted(k for k in once if once[k] is not pristine[k]),
        "changed_by_second": sorted(k for k in twice if twice[k] is not once[k]),
        "seeded_states_kept": states.keys() == states_after.keys()
        and all(states[k].equal(states_after[k]) for k in states),
    }


def case_noop_with_cuda(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    torch.cuda.is_available = lambda: True  # this worker pretends to be a GPU machine
    pristine = _patched_targets()
    needed = compat.cpu_compat_needed()
    applied = compat.apply_cpu_compat()
    after = _patched_targets()
    return {
        "needed": needed,
        "applied": applied,
        "changed": sorted(k for k in after if after[k] is not pristine[k]),
        "still_fails": _error(torch.zeros, 1, device="cuda"),
    }


def case_upstream(rank, world_size):
    """Resolve each dotted ``Shim.upstream`` in the unpatched process."""
    import importlib

    from vespo_megatron.runtime import compat

    found = {}
    for shim in compat.SHIMS:
        path = shim.upstream
        if not all(part.isidentifier() for part in path.split(".")):
            found[shim.shim_id] = "not a dotted path"
            continue
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            rest = parts[cut:]
            break
        else:
            found[shim.shim_id] = "no importable module"
            continue
        try:
            for name in rest:
                obj = getattr(obj, name)
            found[shim.shim_id] = "exists"
        except AttributeError:
            found[shim.shim_id] = "missing"
    from megatron.core.transformer.moe import moe_utils

    # P6 targets a global that moe_utils reads but binds only when Transformer Engine imports.
    referenced = "te_general_gemm" in moe_utils.RouterGatingLinearFunction.forward.__code__.co_names
    return {"found": found, "p6_referenced": referenced, "have_te": moe_utils.HAVE_TE}


CASES = {
    "P1": (case_p1, 1),
    "P2": (case_p2, 1),
    "P3": (case_p3, 1),
    "P5": (case_p5, 1),
    "P6": (case_p6, 1),
    "P7": (case_p7, 1),
    "P8": (case_p8, 2),
    "P9": (case_p9, 1),
    "P10": (case_p10, 1),
    "P11": (case_p11, 1),
    "P12": (case_p12, 1),
    "idempotent": (case_idempotent, 1),
    "noop_with_cuda": (case_noop_with_cuda, 1),
    "upstream": (case_upstream, 1),
}


def _drive(out_path: str) -> None:
    """Run every case in its own forked worker of this (unpatched) process; pickle the outcomes."""
    # Import what the cases use once here, so each fork starts warm.
    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401
    import megatron.core.fusions.fused_softmax  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.optimizer.clip_grads  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401

    from vespo_megatron.runtime import compat
    from vespo_megatron.runtime.local_workers import WorkerError, run_local_workers

    assert not compat.applied_shims(), "the driver process must stay unpatched"
    outcomes = {}
    for name, (fn, world_size) in CASES.items():
        try:
            outcomes[name] = (True, run_local_workers(fn, world_size, timeout_s=120))
        except WorkerError as exc:
            outcomes[name] = (False, str(exc))
        except Exception:  # noqa: BLE001
            outcomes[name] = (False, traceback.format_exc())
    Path(out_path).write_bytes(pickle.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outcomes.pkl"
        proc = subprocess.run(
            [sys.executable, __file__, str(out)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0 and out.exists(), f"driver failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        return pickle.loads(out.read_bytes())


def _result(outcomes, name, rank=0):
    ok, value = outcomes[name]
    assert ok, value
    return value[rank]


def test_p1_global_memory_buffer(outcomes):
    r = _result(outcomes, "P1")
    assert CUDA_MISSING in r["before"]
    assert r["shape"] == (2, 3) and r["device"] == "cpu"


def test_p2_rng_tracker_seeds_and_forks(outcomes):
    r = _result(outcomes, "P2")
    assert CUDA_MISSING in r["before"]
    assert r["reproducible"] and r["streams_differ"] and r["default_untouched"]
    assert r["recompute_mask_matches"] and r["tracker_initialized"]


def test_p3_default_causal_mask(outcomes):
    r = _result(outcomes, "P3")
    for key in ("before", "before_softmax", "before_window"):
        assert CUDA_MISSING in r[key], key
    assert r["mask_ok"] and r["probs_causal"] and r["window_ok"]


def test_p5_streams_for_moe_layer(outcomes):
    r = _result(outcomes, "P5")
    assert "CUDA" in r["before_stream"] and "CUDA" in r["before_layer"]
    assert r["layer"] == "MoELayer" and r["value"] == 2.0


def test_p6_router_gemm(outcomes):
    r = _result(outcomes, "P6")
    assert r["before"].startswith("NameError") and "te_general_gemm" in r["before"]
    assert r["logits_ok"] and r["grads_ok"]


def test_p7_split_sizes_become_numpy(outcomes):
    r = _result(outcomes, "P7")
    assert r["before_type"] == "Tensor" and r["before_a2a"].startswith("TypeError")
    assert r["after_type"] == "ndarray" and r["a2a_ok"]


def test_p8_uneven_gather_and_reduce_scatter(outcomes):
    for rank in (0, 1):
        r = _result(outcomes, "P8", rank)
        assert "invalid tensor size" in r["before_gather"] and r["gather_ok"]
        # gloo's reduce_scatter already takes uneven inputs; the shim must give the same result.
        assert r["before_rs"] == "correct" and r["rs_ok"]


def test_p9_grouped_gemm_matches_loop(outcomes):
    r = _result(outcomes, "P9")
    assert r["before_none"] and "Grouped GEMM is not available" in r["before"]
    assert r["available"] and r["gmm_ok"] and r["gmm_trans_b_ok"]


def test_p10_cuda_factories_and_schedule(outcomes):
    r = _result(outcomes, "P10")
    assert CUDA_MISSING in r["before_zeros"] and CUDA_MISSING in r["before_schedule"]
    assert r["devices"] == ["cpu"] and r["to_dtype"]
    assert r["grad_ok"]  # d(sum of 2 rows of w.x)/dw = 2 per entry, through the real schedule


def test_p11_tensor_type_and_clip(outcomes):
    r = _result(outcomes, "P11")
    assert r["before_type"] == "torch.FloatTensor" and r["before_clip"].startswith("AssertionError")
    assert r["types"] == [
        "torch.cuda.FloatTensor",
        "torch.cuda.HalfTensor",
        "torch.cuda.BFloat16Tensor",
        "torch.LongTensor",
    ]
    assert r["cast"] and r["clipped"]


def test_p12_no_manager_spawn(outcomes):
    r = _result(outcomes, "P12")
    assert r["before_managers"] == 1 and r["after_managers"] == 0 and r["in_process"]


def test_apply_is_idempotent(outcomes):
    r = _result(outcomes, "idempotent")
    first, second, applied = r["ids"]
    assert first == second == applied == r["all_ids"]
    assert "current_device" in r["changed_by_first"] and "tensor_type" in r["changed_by_first"]
    assert r["changed_by_second"] == []
    assert r["seeded_states_kept"]


def test_apply_is_noop_when_cuda_present(outcomes):
    r = _result(outcomes, "noop_with_cuda")
    assert r["needed"] is False and r["applied"] == [] and r["changed"] == []
    assert CUDA_MISSING in r["still_fails"]


def test_shim_upstream_names_exist(outcomes):
    r = _result(outcomes, "upstream")
    for shim_id, status in r["found"].items():
        if shim_id == "P6" and not r["have_te"]:
            assert status == "missing" and r["p6_referenced"]
        elif shim_id == "P10":
            assert status == "not a dotted path"
        else:
            assert status == "exists", (shim_id, status)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        _drive(sys.argv[1])

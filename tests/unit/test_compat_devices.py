"""Device shims P1, P5, P10, P11: each removes one real Megatron-Core CUDA-only failure on CPU.

Every case runs the unpatched upstream call first and records how it fails, then applies that shim
(plus the ones it needs, e.g. P1 before P5) and records the same call's result. See
tests/unit/compat_harness.py for why the cases run in forked workers of a separate interpreter.
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.unit.compat_harness import cuda_missing, drive, error, init_parallel, result, run_driver


def case_p1(rank, world_size):
    import torch
    from megatron.core import parallel_state

    from vespo_megatron.runtime import compat

    init_parallel()
    buffer = parallel_state.get_global_memory_buffer()
    before = error(buffer.get_tensor, (2, 3), torch.float32, "p1")
    compat.shim_current_device()
    out = buffer.get_tensor((2, 3), torch.float32, "p1")
    return {"before": before, "shape": tuple(out.shape), "device": str(out.device)}


def _moe_layer():
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, num_moe_experts=4,
        moe_router_topk=2, moe_token_dispatcher_type="alltoall", add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    # 0.19's local spec gives the MoE layer as a builder (a partial of MoELayer) taking the config.
    build = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    return build(config=config)


def _ddp_grad_sync():
    """One backward through Megatron's DDP and its bucketed grad all-reduce; return (weight, main_grad)."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2, bias=False)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), module)
    module(torch.ones(5, 3)).sum().backward()
    ddp.finish_grad_sync()  # start_grad_sync + wait: the step every training iteration takes
    return module.weight.detach().clone(), module.weight.main_grad.clone()


def case_p5(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    init_parallel()
    compat.shim_current_device()
    compat.shim_cuda_rng_states_tracker()
    compat.shim_cuda_device_factories()
    before_stream = error(torch.cuda.Stream)
    before_layer = error(_moe_layer)
    before_ddp = error(_ddp_grad_sync)  # new in 0.19: start_grad_sync reads the current stream
    compat.shim_cuda_streams()
    layer = _moe_layer()
    _, main_grad = _ddp_grad_sync()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        value = torch.ones(2).sum().item()
    torch.cuda.current_stream().record_event().synchronize()
    torch.cuda.synchronize()
    return {
        "before_stream": before_stream,
        "before_layer": before_layer,
        "before_ddp": before_ddp,
        "layer": type(layer).__name__,
        "value": value,
        # d(sum(W x))/dW over 5 rows of ones = 5 per entry (one rank: the all-reduce is the identity).
        "ddp_grad_ok": torch.equal(main_grad, torch.full((2, 3), 5.0)),
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
        return out, lambda output: (output.sum(), {"loss": output.sum().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batch, model=model,
        num_microbatches=1, seq_length=1, micro_batch_size=2,
    )  # fmt: skip
    return losses, model.weight.grad


def _optimizer_clip_step():
    """Megatron's FP32 optimizer step with gradient clipping (0.19 adds a grad-norm-group flag on "cuda")."""
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    config = OptimizerConfig(optimizer="sgd", lr=1.0, clip_grad=1.0)
    optimizer = FP32Optimizer(torch.optim.SGD([param], lr=1.0), config, None)
    return optimizer.clip_grad_norm(config.clip_grad), param


def case_p10(rank, world_size):
    import torch

    from vespo_megatron.runtime import compat

    init_parallel()
    before_zeros = error(torch.zeros, 2, device="cuda")
    before_schedule = error(_schedule_step)
    compat.shim_tensor_type()
    before_clip = error(_optimizer_clip_step)
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
    norm, param = _optimizer_clip_step()
    return {
        "before_zeros": before_zeros,
        "before_schedule": before_schedule,
        "before_clip": before_clip,
        "devices": sorted({str(t.device) for t in made}),
        "to_dtype": made[-1].dtype == torch.float64,
        "grad_ok": torch.equal(grad, torch.full((1, 3), 2.0)),
        "norm": norm,
        "clipped": torch.allclose(param.grad, torch.full((4,), 2.0 / (4.0 + 1e-6))),
    }


def case_p11(rank, world_size):
    import torch
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from vespo_megatron.runtime import compat

    compat.shim_cuda_device_factories()  # the clip path also allocates on "cuda"
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    before_type = torch.zeros(1).type()
    before_clip = error(clip_grad_by_total_norm_fp32, [param], 1.0, 4.0)
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


CASES = {"P1": (case_p1, 1), "P5": (case_p5, 1), "P10": (case_p10, 1), "P11": (case_p11, 1)}


@pytest.fixture(scope="module")
def outcomes():
    return run_driver(__file__)


def test_p1_global_memory_buffer(outcomes):
    r = result(outcomes, "P1")
    assert cuda_missing(r["before"]), r["before"]
    assert r["shape"] == (2, 3) and r["device"] == "cpu"


def test_p5_streams_for_moe_layer_and_ddp(outcomes):
    r = result(outcomes, "P5")
    for key in ("before_stream", "before_layer", "before_ddp"):
        assert cuda_missing(r[key]), (key, r[key])
    assert r["layer"] == "MoELayer" and r["value"] == 2.0
    assert r["ddp_grad_ok"]


def test_p10_cuda_factories_schedule_and_optimizer(outcomes):
    r = result(outcomes, "P10")
    for key in ("before_zeros", "before_schedule", "before_clip"):
        assert cuda_missing(r[key]), (key, r[key])
    assert r["devices"] == ["cpu"] and r["to_dtype"]
    assert r["grad_ok"]  # d(sum of 2 rows of w.x)/dw = 2 per entry, through the real schedule
    assert r["norm"] == pytest.approx(4.0) and r["clipped"]  # |(2, 2, 2, 2)| = 4, clipped to norm 1


def test_p11_tensor_type_and_clip(outcomes):
    r = result(outcomes, "P11")
    assert r["before_type"] == "torch.FloatTensor" and r["before_clip"].startswith("AssertionError")
    assert r["types"] == [
        "torch.cuda.FloatTensor",
        "torch.cuda.HalfTensor",
        "torch.cuda.BFloat16Tensor",
        "torch.LongTensor",
    ]
    assert r["cast"] and r["clipped"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        drive(CASES, sys.argv[1])

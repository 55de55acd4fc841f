"""Where tensors live: micro-batches enter the model on its device, collective buffers on the group's.

On the CPU both helpers must be the identity (the gloo path stays bit for bit what it was); the CUDA
cases run only where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vespo_megatron.rl.batch import segment_ids
from vespo_megatron.runtime.distributed import collective_device
from vespo_megatron.train.batches import batch_to_device
from vespo_megatron.models.gpt import model_device


@pytest.fixture
def gloo_world(tmp_path):
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def test_collective_device_of_a_gloo_group_is_the_cpu(gloo_world):
    assert collective_device() == torch.device("cpu")
    group = dist.new_group([0], backend="gloo")
    assert collective_device(group) == torch.device("cpu")


def test_batch_to_cpu_keeps_the_same_tensors():
    batch = {"tokens": torch.arange(6).view(2, 3), "loss_mask": torch.ones(2, 3), "name": "x", "n": 3}
    moved = batch_to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys()
    for key in ("tokens", "loss_mask"):
        assert moved[key] is batch[key]
    assert moved["name"] == "x" and moved["n"] == 3


def test_model_device_follows_the_parameters():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_segment_ids_on_the_mask_device():
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = torch.tensor([[-1, 1], [0, -1], [0, -1]])
    assert torch.equal(segment_ids(mask), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_and_segment_ids_on_cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    batch = batch_to_device({"tokens": torch.arange(6).view(2, 3), "loss_mask": torch.ones(2, 3)}, device)
    assert all(value.device == device for value in batch.values())
    assert segment_ids(batch["loss_mask"]).device == device
